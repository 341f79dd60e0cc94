"""The explicit state of a reversible solver: two latents and their times, a value that saves and moves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import torch

__all__ = ["State", "check_latent", "check_state", "load", "save"]


@dataclasses.dataclass(frozen=True, eq=False, init=False)
class State:
    """``x`` at time ``t`` and ``x_prev`` at ``t_prev``: the pair a two-step solver continues from.

    A *pair* (``coupled=False``, BDIA and its family): ``x_prev`` is the point just before ``x`` on the walk that
    made it. ``bdia.sample`` returns ``(x_1, x_0)`` (``x`` the sample); ``bdia.invert`` returns ``(x_{N-1}, x_N)``
    (``x`` the inverted latent); each accepts the other's state and continues from that pair, so sampling from an
    inverted state rebuilds the data exactly (for exact solvers).

    *Coupled* copies (``coupled=True``, EDICT): two latents at one time, ``x`` the output and ``x_prev`` its
    partner. A solver refuses a state of the other kind: continuing one with the wrong solver is silently wrong.

    A frozen value: ``replace(**changes)`` makes a modified copy, ``to(...)`` moves or casts both latents
    (``Tensor.to``'s arguments), ``state_dict()`` / ``bdia.state.load`` / ``bdia.state.save`` store it.
    """

    x_prev: torch.Tensor
    x: torch.Tensor
    t_prev: float
    t: float
    coupled: bool = False

    _kinds: ClassVar[dict[str, type[State]]] = {}

    def __init__(self, x_prev: torch.Tensor, x: torch.Tensor, t_prev: float, t: float, coupled: bool = False):
        # (the frozen dataclass's own __init__ sets each field through object.__setattr__: three times slower,
        # and a walk makes a state per step; subclasses get the generated one)
        d = self.__dict__
        d["x_prev"], d["x"], d["t_prev"], d["t"], d["coupled"] = x_prev, x, t_prev, t, coupled

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        State._kinds[cls.__name__] = cls

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
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> State:
        """The state that ``state_dict`` described (of the type it names: a ``State`` or a subclass such as
        ``bdia.exact.ExactState``)."""
        if not isinstance(d, dict) or "type" not in d:
            raise TypeError("expected a dict made by State.state_dict() (with a 'type' entry)")
        kind = State._kinds.get(d["type"]) if d["type"] != "State" else State
        if kind is None:
            raise ValueError(f"unknown state type {d['type']!r}; expected one of {['State', *State._kinds]}")
        return check_state(kind._from_dict(d), "the loaded state")

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> State:
        return State(d["x_prev"], d["x"], float(d["t_prev"]), float(d["t"]), bool(d["coupled"]))


def save(state: State, path: str | Path) -> None:
    """Write ``state`` to ``path``: safetensors when the name ends in ``.safetensors`` (tensors as tensors, the rest
    as JSON metadata; needs the ``safetensors`` package), else ``torch.save`` of ``state.state_dict()``."""
    check_state(state)
    d, path = state.state_dict(), Path(path)
    if path.suffix != ".safetensors":
        torch.save(d, path)
        return
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta = _flatten(d, "", tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"bdia.state": json.dumps(meta)})


def load(path: str | Path, device: torch.device | str = "cpu") -> State:
    """Read a state written by ``save`` (``torch.load(weights_only=True)`` or safetensors: no code is unpickled)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return State.from_state_dict(torch.load(path, map_location=device, weights_only=True))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = (f.metadata() or {}).get("bdia.state")
        if meta is None:
            raise ValueError(f"{path} holds no bdia state (no 'bdia.state' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return State.from_state_dict(_unflatten(json.loads(meta), tensors))


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
    check_latent(s.x, f"{name}.x")
    check_latent(s.x_prev, f"{name}.x_prev")
    for what in ("shape", "dtype", "device"):
        a, b = getattr(s.x_prev, what), getattr(s.x, what)
        if a != b:
            raise ValueError(f"{name}.x_prev and {name}.x must share {what}: got {a} and {b}")
    for what in ("t_prev", "t"):
        if not isinstance(getattr(s, what), float):
            raise TypeError(f"{name}.{what} must be a python float, got {type(getattr(s, what)).__name__}")
    if not isinstance(s.coupled, bool):
        raise TypeError(f"{name}.coupled must be a bool, got {type(s.coupled).__name__}")
    if s.coupled != (s.t_prev == s.t):
        raise ValueError(
            f"{name} has times ({s.t_prev}, {s.t}) with coupled={s.coupled}: coupled copies (EDICT) share one "
            "time, a pair of consecutive points has two"
        )
    return s
