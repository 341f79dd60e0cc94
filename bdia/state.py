"""The explicit state of a reversible solver: two latents and their times, a value that saves and moves.

A state also says where it came from: ``grid``, the grid times the walks that made it passed through, and
``solver``, the identity of the solver that made it (``bdia.solvers.identity``). ``bdia.sample`` and
``bdia.invert`` stamp both and refuse, before any network call, to continue a state on another grid or with another
solver: the pair alone cannot tell (every Stable Diffusion ``leading`` grid ends with the times (1, 0)).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import operator
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["State", "check_latent", "check_state", "load", "save"]


@dataclasses.dataclass(frozen=True, eq=False, init=False, repr=False)
class State:
    """``x`` at time ``t`` and ``x_prev`` at ``t_prev``: the pair a two-step solver continues from.

    A *pair* (``coupled=False``, BDIA and its family): ``x_prev`` is the point just before ``x`` on the walk that
    made it. ``bdia.sample`` returns ``(x_1, x_0)`` (``x`` the sample); ``bdia.invert`` returns ``(x_{N-1}, x_N)``
    (``x`` the inverted latent); each accepts the other's state and continues from that pair, so sampling from an
    inverted state rebuilds the data exactly (for exact solvers).

    *Coupled* copies (``coupled=True``, EDICT): two latents at one time, ``x`` the output and ``x_prev`` its
    partner. A solver refuses a state of the other kind: continuing one with the wrong solver is silently wrong.

    Provenance (``None`` for a state built by hand): ``grid``, every grid time the walks that made the state passed
    through, noisiest first, and ``solver``, the identity of the solver that made it. A walk that continues the
    state must follow ``grid`` wherever it records the way ahead, and use the same solver (``replace(grid=None,
    solver=None)`` makes an anonymous pair, checked only against the two times it holds).

    A frozen value: ``replace(**changes)`` makes a modified copy, ``to(...)`` moves or casts both latents
    (``Tensor.to``'s arguments), ``state_dict()`` / ``bdia.state.load`` / ``bdia.state.save`` store it.
    """

    x_prev: torch.Tensor
    x: torch.Tensor
    t_prev: float
    t: float
    coupled: bool = False
    grid: tuple[float, ...] | None = None
    solver: str | None = None

    _kinds: ClassVar[dict[str, type[State]]] = {}

    def __init__(
        self,
        x_prev: torch.Tensor,
        x: torch.Tensor,
        t_prev: float,
        t: float,
        coupled: bool = False,
        grid: tuple[float, ...] | None = None,
        solver: str | None = None,
    ):
        # (the frozen dataclass's own __init__ sets each field through object.__setattr__: three times slower,
        # and a walk makes a state per step; subclasses get the generated one)
        d = self.__dict__
        d["x_prev"], d["x"], d["t_prev"], d["t"], d["coupled"] = x_prev, x, t_prev, t, coupled
        d["grid"], d["solver"] = grid, solver

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        State._kinds[cls.__name__] = cls

    def __getstate__(self) -> dict[str, Any]:
        # (a copy or an unpickled state holds other tensors: the seal of the walk that made this one stays here)
        return {k: v for k, v in self.__dict__.items() if k != "_sealed"}

    def flipped(self) -> State:
        """The same state seen from the other direction of travel (coupled copies have no direction)."""
        if self.coupled:
            return self
        return dataclasses.replace(self, x_prev=self.x, x=self.x_prev, t_prev=self.t, t=self.t_prev)

    def replace(self, **changes: Any) -> State:
        """A copy with some fields changed (``dataclasses.replace``: every other field, subclasses' too, is kept)."""
        return dataclasses.replace(self, **changes)

    _replace = replace  # the name a NamedTuple state had

    def to(self, *args: Any, **kwargs: Any) -> State:
        """Both latents through ``Tensor.to(*args, **kwargs)`` (a device, a dtype or both); times are unchanged."""
        return dataclasses.replace(self, x_prev=self.x_prev.to(*args, **kwargs), x=self.x.to(*args, **kwargs))

    def __getitem__(self, rows: Any) -> State:
        """The samples ``rows`` of the batch (an int keeps its batch dimension), e.g. to invert one of them."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 or None)  # (rows = -1: slice(-1, None))
        return dataclasses.replace(self, x_prev=self.x_prev[rows], x=self.x[rows])

    def __repr__(self) -> str:
        x = self.x
        where = "" if self.grid is None else f", grid=<{len(self.grid)} times>"
        made = "" if self.solver is None else f", solver={self.solver!r}"
        kind = ", coupled=True" if self.coupled else ""
        return (
            f"{type(self).__name__}(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device}, "
            f"t_prev={self.t_prev}, t={self.t}{kind}{where}{made})"
        )

    def state_dict(self) -> dict[str, Any]:
        """The state as a plain dict of tensors, floats, ints, strings and lists, which ``torch.save`` stores and
        ``torch.load(weights_only=True)`` reads back (no code is unpickled). Times are python floats: exact."""
        return {
            "type": type(self).__name__,
            "x_prev": self.x_prev,
            "x": self.x,
            "t_prev": self.t_prev,
            "t": self.t,
            "coupled": self.coupled,
            "grid": None if self.grid is None else list(self.grid),
            "solver": self.solver,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], *, name: str = "the state") -> State:
        """The state that ``state_dict`` described (of the type it names: a ``State`` or a subclass such as
        ``bdia.exact.ExactState``). Missing or malformed entries are named in a ``ValueError``; ``name`` says what
        was read (e.g. the file)."""
        if not isinstance(d, dict) or "type" not in d:
            raise ValueError(f"{name} is not a dict made by State.state_dict() (it has no 'type' entry)")
        kind = State._kinds.get(d["type"]) if d["type"] != "State" else State
        if kind is None:
            raise ValueError(f"{name}: unknown state type {d['type']!r}; expected one of {['State', *State._kinds]}")
        try:
            state = kind._from_dict(d)
        except KeyError as e:
            raise ValueError(f"{name} lacks the entry {e.args[0]!r} of a {d['type']} state_dict") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} holds a malformed {d['type']} state_dict: {e}") from None
        return check_state(state, name)

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> State:
        return State(d["x_prev"], d["x"], float(d["t_prev"]), float(d["t"]), bool(d["coupled"]), **_provenance(d))


def _provenance(d: dict[str, Any]) -> dict[str, Any]:
    """The provenance entries of a state_dict (absent in files written before states carried them)."""
    grid, solver = d.get("grid"), d.get("solver")
    if grid is not None:
        if not isinstance(grid, list | tuple):
            raise TypeError(f"'grid' must be a list of times, got {type(grid).__name__}")
        grid = tuple(float(t) for t in grid)
    return {"grid": grid, "solver": solver}


def save(state: State, path: str | Path) -> None:
    """Write ``state`` to ``path``: safetensors when the name ends in ``.safetensors`` (any case; tensors as tensors,
    the rest as JSON metadata; needs the ``safetensors`` package), else ``torch.save`` of ``state.state_dict()``."""
    check_state(state)
    d, path = state.state_dict(), Path(path)
    if path.suffix.lower() != ".safetensors":
        torch.save(d, path)
        return
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(d, "", tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"bdia.state": json.dumps(meta)})


def load(path: str | Path, device: torch.device | str = "cpu") -> State:
    """Read a state written by ``save`` (``torch.load(weights_only=True)`` or safetensors: no code is unpickled)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return State.from_state_dict(torch.load(path, map_location=device, weights_only=True), name=str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = (f.metadata() or {}).get("bdia.state")
        if meta is None:
            raise ValueError(f"{path} holds no bdia state (no 'bdia.state' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    try:
        described = json.loads(meta)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its 'bdia.state' metadata is not JSON ({e})") from None
    try:
        d = _unflatten(described, tensors)
    except KeyError as e:
        raise ValueError(f"{path}: its metadata names the tensor {e.args[0]!r}, which the file does not hold") from None
    return State.from_state_dict(d, name=str(path))


def _flatten(v: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able metadata for ``v`` with each tensor moved into ``tensors`` under a dotted key."""
    if isinstance(v, torch.Tensor):
        tensors[key] = v
        return {"tensor": key}
    if isinstance(v, dict):
        return {k: _flatten(w, f"{key}.{k}" if key else k, tensors) for k, w in v.items()}
    if isinstance(v, list | tuple):
        return [_flatten(w, f"{key}.{i}", tensors) for i, w in enumerate(v)]
    return v  # float (json keeps every bit: repr round-trips), int, str, bool


def _unflatten(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, dict):
        if set(v) == {"tensor"}:
            return tensors[v["tensor"]]
        return {k: _unflatten(w, tensors) for k, w in v.items()}
    if isinstance(v, list):
        return [_unflatten(w, tensors) for w in v]
    return v


def check_latent(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a bdia.State, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
    return x


def check_state(s: State, name: str = "state") -> State:
    """Both latents must share shape, dtype and device; the times must be python floats, equal for coupled copies."""
    if not isinstance(s, State):
        raise TypeError(f"{name} must be a bdia.State, got {type(s).__name__}")
    older, newer = s.x_prev, s.x
    for latent, which in ((newer, "x"), (older, "x_prev")):
        if not (isinstance(latent, torch.Tensor) and latent.is_floating_point() and latent.dim() >= 1):
            check_latent(latent, f"{name}.{which}")  # (raises; the name is built only then)
    if older.shape != newer.shape or older.dtype != newer.dtype or older.device != newer.device:
        for what in ("shape", "dtype", "device"):
            a, b = getattr(older, what), getattr(newer, what)
            if a != b:
                raise ValueError(f"{name}.x_prev and {name}.x must share {what}: got {a} and {b}")
    if not (isinstance(s.t_prev, float) and isinstance(s.t, float)):
        what = "t_prev" if not isinstance(s.t_prev, float) else "t"
        raise TypeError(f"{name}.{what} must be a python float, got {type(getattr(s, what)).__name__}")
    if not isinstance(s.coupled, bool):
        raise TypeError(f"{name}.coupled must be a bool, got {type(s.coupled).__name__}")
    if s.coupled != (s.t_prev == s.t):
        raise ValueError(
            f"{name} has times ({s.t_prev}, {s.t}) with coupled={s.coupled}: coupled copies (EDICT) share one "
            "time, a pair of consecutive points has two"
        )
    if s.grid is not None:
        g = s.grid
        # (a sum of finite floats is finite unless it passes 1e308: only then is each time looked at)
        if (
            not isinstance(g, tuple)
            or not set(map(type, g)) <= {float}
            or not (math.isfinite(sum(g)) or all(map(math.isfinite, g)))
        ):
            raise TypeError(f"{name}.grid must be None or a tuple of finite python floats (noisiest first)")
        if not all(map(operator.gt, g, itertools.islice(g, 1, None))) or s.t not in g or s.t_prev not in g:
            raise ValueError(
                f"{name}.grid must be strictly decreasing and hold the state's own times ({s.t_prev}, {s.t})"
            )
    if s.solver is not None and not isinstance(s.solver, str):
        raise TypeError(f"{name}.solver must be None or a str (bdia.solvers.identity), got {type(s.solver).__name__}")
    return s


def _seal(state: State) -> State:
    """Mark ``state``, just made by a walk that checked it (``check_finite``, no callback), as valid and finite.

    Such a state's fields are valid by construction and its latents were found finite, so a walk continuing it need
    not repeat ``check_state`` and the input's reductions. The mark holds while both latents keep the version that
    every in-place operation on a tensor (or a view of it) bumps; ``replace``, ``to``, copies and pickles make
    unmarked states. (A write that bypasses the version counter, through ``.data`` or numpy, is found by the finite
    check at the end of the walk, whose replay checks its input again.) Inference tensors (made under
    ``torch.inference_mode``) keep no version counter and can be edited in place unseen, so their states stay
    unmarked and are checked again by every walk."""
    x, x_prev = state.x, state.x_prev
    if not (x.is_inference() or x_prev.is_inference()):
        state.__dict__["_sealed"] = (x._version, x_prev._version)
    return state


def _sealed(state: State) -> bool:
    """Whether ``state`` is as the walk that sealed it (``_seal``) left it."""
    seal = state.__dict__.get("_sealed")
    return seal is not None and seal == (state.x._version, state.x_prev._version)


def _pair(state: State, solver: object) -> State:
    """``state`` if it is a pair of consecutive points (what BDIA and the integrators continue)."""
    if state.coupled:
        raise ValueError(
            f"{solver!r} continues a pair of consecutive points, got coupled copies at one time "
            f"(t = {state.t}), made by EDICT: continue an EDICT state with EDICT"
        )
    return state


def _coupled(state: State) -> State:
    """``state`` if it holds coupled copies at one time (what EDICT continues)."""
    if not state.coupled:
        raise ValueError(
            f"EDICT continues coupled copies at one time (a state made by EDICT), got a pair of consecutive points at "
            f"times ({state.t_prev}, {state.t}), made by another solver"
        )
    return state
