"""``sample`` and ``invert``: thin loops over a walk's plan, and the bookkeeping every integration shares.

A walk turns (model, solver, grid, direction, latent kind) into a plan once (``solver.plan``, or the solver's own
``step`` / ``unstep`` at each grid time), checks everything before the first network call, runs the plan's steps and
stamps the result with where it came from. ``cut`` (img2img's strength), ``locate`` (where a state sits on a grid,
and whether it may continue there) and ``stamp`` (a state's provenance) are the pieces integrations reuse.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from bdia.models import Denoiser, Prediction, Prepared
from bdia.protocols import Plan, Solver, Stepping
from bdia.schedules import Schedule, check_grid
from bdia.state import State, _seal, _sealed, check_latent, check_state

__all__ = ["Step", "check", "cut", "invert", "limits", "locate", "sample", "stamp"]


class Step:
    """What a callback sees after each step: ``i`` (steps taken on the grid so far), the step's times ``t`` ->
    ``t_next`` (in the walk's direction), ``state`` (the state after the step, oriented as the walk returns it),
    ``x`` (the latent of the step's first model evaluation, at ``t``) and ``x0`` (that evaluation's prediction of
    the clean data, built on first access). Return ``True`` (or any true bool, numpy bool, int or one-element
    tensor) from the callback to stop the walk after this step: it then returns ``state``."""

    __slots__ = ("_pred", "i", "state", "t", "t_next", "x")

    def __init__(self, i: int, t: float, t_next: float, state: State, x: torch.Tensor, pred: Prediction):
        self.i, self.t, self.t_next, self.state, self.x, self._pred = i, t, t_next, state, x, pred

    @property
    def x0(self) -> torch.Tensor:
        return self._pred.x0

    def __repr__(self) -> str:
        return f"Step(i={self.i}, t={self.t}, t_next={self.t_next})"


Callback = Callable[[Step], Any]


def sample(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Solver,
    *,
    strength: float | None = None,
    grad: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
    check_finite: bool = True,
    max_amplification: float | None = None,
    **model_kwargs: Any,
) -> State:
    """Integrate from ``ts[0]`` (noisiest) to ``ts[-1]``; returns a ``State`` whose ``x`` is the sample.

    ``x`` is a latent at ``ts[0]`` or a ``State`` from ``invert`` over the same grid (whose pair is then continued,
    never regenerated), or from an earlier ``sample`` ending at ``ts[0]``. ``strength`` in (0, 1] walks only the
    last ``int(strength N)`` of the grid's N steps (img2img's sense; pair it with ``invert(..., strength=)``).
    ``model_kwargs`` go to every model call (conditioning); a network keyword named like one of this function's
    keywords is taken by the walk (wrap the network to rename it). No autograd graph is recorded unless
    ``grad=True`` (for gradients at constant memory see ``bdia.gradients.sample_with_grad``). ``callback(step)`` runs
    after every step (see ``Step``) and stops the walk by returning true. ``check_finite`` refuses a non-finite input
    before any model call and raises, naming the first failing step, if a step produced NaN or inf (for solvers that
    declare ``nonfinite_persists``, one reduction of the final latent and a replay of a failing walk).
    ``max_amplification``: see ``invert``. The returned state records the grid walked and the solver's identity.
    """
    return _run(
        _Walk(
            model,
            x,
            ts,
            solver,
            True,
            strength,
            grad,
            progress,
            callback,
            check_finite,
            max_amplification,
            model_kwargs,
        )
    )


def invert(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Solver,
    *,
    strength: float | None = None,
    grad: bool = False,
    progress: bool = False,
    callback: Callback | None = None,
    check_finite: bool = True,
    max_amplification: float | None = None,
    **model_kwargs: Any,
) -> State:
    """Walk the same grid backwards, from ``ts[-1]`` to ``ts[0]``; returns a ``State`` whose ``x`` is at ``ts[0]``.

    ``x`` is data at ``ts[-1]`` (a real image: its first step is one plain integrator step, the only approximation
    of an exact solver; on a grid ending at sigma = 0 that step predicts the noise at the next grid time, see
    ``bdia.integrators``) or a ``State`` returned by ``sample`` over the same grid (then the inversion is exact up to
    rounding). ``strength`` in (0, 1] inverts only the last ``int(strength N)`` steps (partial inversion for
    editing). With a one-step integrator as ``solver`` this is classic approximate DDIM-style inversion.

    ``max_amplification``: the walk is refused before any model call if ``solver.amplification`` (how much it can
    grow one rounding error, an estimate that does not see the network) exceeds it; by default ``max(16, 0.1 / eps)``
    of the latent's dtype (one rounding grown to 10% of the data's scale), and a walk past ``0.01 / eps`` is warned
    about (``bdia.sampling.limits``; docs/theory.md, "Rounding"). The other keywords are those of ``sample``.
    """
    return _run(
        _Walk(
            model,
            x,
            ts,
            solver,
            False,
            strength,
            grad,
            progress,
            callback,
            check_finite,
            max_amplification,
            model_kwargs,
        )
    )


class _Walk(NamedTuple):
    """One call of ``sample`` / ``invert``, as given (``every_step``: a replay's per-step finite check)."""

    model: Denoiser
    x: torch.Tensor | State
    ts: torch.Tensor
    solver: Solver
    forward: bool
    strength: float | None
    grad: bool
    progress: bool
    callback: Callback | None
    check_finite: bool
    max_amplification: float | None
    kw: dict[str, Any]
    every_step: bool | None = None


class _Start(NamedTuple):
    """A walk ready to run: its plan, the state at its front (oriented as solvers take it: ``x_prev`` the noisier
    point) and ``k``, the index of the plan's walk that the state has reached."""

    plan: Plan
    state: State
    k: int


def _run(w: _Walk) -> State:
    recorder = None
    if w.callback is not None:
        if not callable(w.callback):
            raise TypeError(f"callback must be callable as callback(step), got {type(w.callback).__name__}")
        _check_model(w.model)  # (before wrapping it)
        recorder = _FirstEvaluation(w.model)
    model = recorder or w.model
    with _NO_CHANGE if torch.is_grad_enabled() == w.grad else torch.set_grad_enabled(w.grad):
        plan, state, k = _begin(w, model)
        walk, forward, kw = plan.walk, w.forward, w.kw
        n = len(walk) - 1
        every = _FiniteCheck.every_step(w.solver) if w.every_step is None else w.every_step
        # (a walk whose solver carries NaN and inf to its end checks its end only: no recorder, no per-step work)
        check = (
            _FiniteCheck(walk, w.solver, state.x, replayed=w.every_step is True) if w.check_finite and every else None
        )
        watch = recorder is not None or check is not None  # (else nothing to do per step)
        # a walk that owns its latents and shows them to no one writes each step into the latent it drops (large
        # latents only: there a fresh tensor is a fresh memory mapping; smaller ones come from the allocator's cache)
        reuse = recorder is None and not w.grad and state.x.numel() * state.x.element_size() >= _REUSE_BYTES
        owned_prev, owned_x = False, k == 1 and not isinstance(w.x, State)
        run = getattr(plan, "run", None)
        if run is not None and not watch and not w.progress and k < n:
            # nothing to see between steps: the plan runs them in one loop of its own, taking the first state from a
            # box (an argument stays referenced by the caller for the whole call: one latent more held)
            box = [state]
            del state
            state, reached = run(model, box, k + 1, kw, reuse, (owned_prev, owned_x)), n
        else:
            # step by step, each step reported (written here, not in a function: the walk's first state, passed to a
            # function, would stay referenced by this frame for the whole walk: one latent more held)

            def after(j: int) -> bool:
                """Record and report the step that reached ``walk[j]``; True: the callback stops the walk."""
                if check is not None:
                    check.record(j, state, forward)
                if recorder is None:
                    return False
                step = Step(j, walk[j - 1], walk[j], _facing(state, forward), *recorder.first)
                return _stops(w.callback(step))

            reached = k
            stop = k == 1 and not isinstance(w.x, State) and after(1)
            scratch = None
            # (tqdm is built only when shown: even disabled it costs a few steps' worth of a short walk)
            bar = tqdm(total=n, initial=k, desc="sample" if forward else "invert") if w.progress else None
            with bar or contextlib.nullcontext():
                for j in range(reached + 1, n + 1):
                    if stop:
                        break
                    if recorder is not None:
                        recorder.first = None
                    into = None
                    if reuse and (owned_prev if forward else owned_x):
                        if scratch is None:
                            scratch = torch.empty_like(state.x)
                        into = (scratch, state.x_prev if forward else state.x)
                    state = plan.step(model, state, j, kw, into)
                    owned_prev, owned_x = (owned_x, True) if forward else (True, owned_prev)
                    reached = j
                    if bar is not None:
                        bar.update()
                    stop = after(j)
    if check is not None:
        check.raise_if_bad(state)
    elif w.check_finite and not _finite(
        *((state.x, state.x_prev) if state.coupled else (state.x if forward else state.x_prev,))
    ):
        # the final state is not finite: replay without the callback, recording every step, to name the first
        # failing one (the replay raises; if it does not, the model did not reproduce its output)
        _run(w._replace(grad=False, progress=False, callback=None, every_step=True))
        raise _nonfinite(walk, w.solver, state, -1, False)
    before = w.x.grid if isinstance(w.x, State) else None
    walked = walk if reached == n else walk[: reached + 1]
    made = _stamp(_facing(state, forward), walked, _made_by(plan, w.solver), before, on_walk=True)
    # (a walk that showed its latents to no one and found them finite vouches for the state it returns)
    return _seal(made) if w.check_finite and recorder is None and type(made) is State else made


_REUSE_BYTES = 1 << 22
_NO_CHANGE = contextlib.nullcontext()  # (reusable)


def _begin(w: _Walk, model: Denoiser, init: bool = True) -> _Start:
    """Validate a walk, make its plan and take its first step if it starts from a lone latent: everything before
    the loop. Refused before any model call: a model that is not a denoiser, a solver that is not one, a bad grid
    or strength, a non-finite input (``check_finite``), a state that does not continue the grid or was made by
    another solver (``locate``), and a walk whose amplification of rounding exceeds ``max_amplification``. With
    ``init=False`` a lone latent is validated but not stepped (``state`` is then ``None``, ``k`` 0)."""
    key, plan = _kept(w, model)
    if plan is None:
        _check_model(model)
        _check_solver(w.solver)
        grid = cut(check_grid(w.ts, model.schedule), w.strength)
        walk = grid if w.forward else grid[::-1]
    given = w.x if isinstance(w.x, State) else None
    # (a state that a checked walk made, unchanged since, passed these checks when it was made; a replay repeats
    # them, to name a bad input: state._seal)
    sealed = given is not None and w.every_step is None and _sealed(given)
    if given is None:
        latent = check_latent(w.x)
    else:
        latent = (given if sealed else check_state(given, "x")).x
    if w.check_finite and not sealed and not _finite(*([given.x_prev, given.x] if given is not None else [latent])):
        raise FloatingPointError("non-finite values (NaN or inf) in the input x")
    if plan is None:
        plan = _plan(model, w.solver, walk, w.forward, latent, key)
    walk = plan.walk
    _check_amplification(plan.amplification, w.solver, w.forward, latent.dtype, w.max_amplification)
    if given is not None:
        # (validated above; the solver's identity as the plan computed it once)
        state, k = _position(given, walk, _made_by(plan, w.solver), "x (a bdia.State)")
        if k > 1:
            raise ValueError(
                f"x (a bdia.State) holds times that do not continue this grid from its start: it sits at t = "
                f"{walk[k]}, {k} steps into the grid (which {'samples' if w.forward else 'inverts'} from t={walk[0]}); "
                "pass the grid from there, or the strength that made it"
            )
    if given is None and not init:
        return _Start(plan, None, 0)  # type: ignore[arg-type]
    if given is None:
        # (a pair solver's first step reaches walk[1]; coupled copies start where the latent is, at walk[0])
        state, k = _position(plan.init(model, latent, w.kw), walk, None, "the solver's first step")
    return _Start(plan, state, k)


def check(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Solver,
    *,
    forward: bool = True,
    strength: float | None = None,
    check_finite: bool = True,
    max_amplification: float | None = None,
) -> None:
    """Everything ``sample`` (``forward``) or ``invert`` refuses before any model call, without walking: for an
    integration with costs of its own before the walk (a pipeline's text encoders). The walk's plan is made (and
    kept for the walk that follows, with the same model and solver); no network is called."""
    w = _Walk(model, x, ts, solver, forward, strength, False, False, None, check_finite, max_amplification, {})
    _begin(w, model, init=False)


def cut(grid: list[float], strength: float | None) -> list[float]:
    """The last ``int(strength * N)`` steps of an N-step grid (noisiest first), as diffusers' img2img counts them;
    ``None``: the whole grid."""
    if strength is None:
        return grid
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not (0.0 < strength <= 1.0):
        raise ValueError(
            f"strength must be a float in (0, 1] (the share of the grid's steps to walk), got {strength!r}"
        )
    n = len(grid) - 1
    k = min(int(n * strength), n)  # as diffusers' img2img: int(num_inference_steps * strength)
    if k < 1:
        raise ValueError(f"strength={strength} walks int({n} * {strength}) = 0 of the grid's {n} steps; use more")
    return grid[n - k :]


def locate(state: State, walk: list[float], solver: object | None = None, *, name: str = "state") -> tuple[State, int]:
    """Where ``state`` sits on ``walk`` (a grid in walk order: noisiest first to sample, reversed to invert), and
    whether ``solver`` may continue it there.

    Returns the state as solvers take it (sampling orientation: ``x_prev`` the noisier point) and ``k``, the index in
    ``walk`` of the point the walk has reached. Refuses (a ``ValueError`` naming ``name``): a pair that is not two
    consecutive points of the walk (or its front at ``walk[0]`` with the other point behind it), coupled copies not
    at a time of the walk, and, where both the state and the solver say who they are (``State.solver``,
    ``bdia.solvers.identity``), a state made by another scheme or on a grid whose recorded way ahead differs from the
    walk's (e.g. another step count of a grid family that shares its last two points).
    """
    return _position(check_state(state, name), walk, getattr(solver, "identity", None), name)


def _position(state: State, walk: list[float], made_by: str | None, name: str) -> tuple[State, int]:
    """``locate`` of a state already validated (``check_state``), or made by the walk's own plan; ``made_by``: the
    identity of the solver that is to continue it (``None``: not checked)."""
    s = _facing(state, state.t_prev > state.t)
    forward = len(walk) < 2 or walk[0] > walk[1]
    front, behind = (s.t, s.t_prev) if forward else (s.t_prev, s.t)
    k = walk.index(front) if front in walk else -1
    if k < 0 or (not s.coupled and k > 0 and walk[k - 1] != behind):
        what = f"the time {front}" if s.coupled else f"the times ({state.t_prev}, {state.t})"
        where = (
            "a time of it" if s.coupled else "two consecutive points of it, or its first point with the other before it"
        )
        raise ValueError(
            f"{name} holds {what}, which do not continue this grid ({_show(walk)}, in walk order; a state must hold "
            f"{where}): pass the grid that made it"
        )
    if made_by is None or state.solver is None:
        return s, k
    if made_by != state.solver:
        raise ValueError(
            f"{name} was made by {state.solver}; {made_by} does not continue it exactly (a state made by another "
            "solver is not retraced by its steps): pass a solver configured as the one that made it, or "
            "state.replace(solver=None) to continue it deliberately with another"
        )
    if state.grid is not None:
        history = state.grid if forward else state.grid[::-1]
        m = history.index(front)
        ahead = min(len(history) - m, len(walk) - k)
        if list(history[m : m + ahead]) == walk[k : k + ahead]:
            return s, k  # (the usual case, compared at once; else the first difference is named)
        for i in range(1, ahead):
            if walk[k + i] != history[m + i]:
                raise ValueError(
                    f"{name} was made on a grid whose next time after t={history[m + i - 1]} is {history[m + i]}, but "
                    f"this walk goes to {walk[k + i]}: pass the grid that made it ({_show(list(state.grid))}, kept in "
                    "state.grid), or state.replace(grid=None) to continue it deliberately on another"
                )
    return s, k


def stamp(state: State, walked: list[float], solver: object, *, before: tuple[float, ...] | None = None) -> State:
    """``state`` (as a walk reports it) with its provenance: the times walked merged into ``state.grid`` (and into
    ``before``, the grid of the state the walk started from), and ``state.solver`` the solver's identity
    (``bdia.solvers.identity``; None for a one-step integrator)."""
    return _stamp(state, walked, getattr(solver, "identity", None), before)


def _stamp(
    state: State, walked: list[float], identity: str | None, before: tuple[float, ...] | None, on_walk: bool = False
) -> State:
    """``stamp`` with the solver's identity given (``on_walk``: the state's times are known to be times walked)."""
    ordered = walked if len(walked) < 2 or walked[0] > walked[1] else walked[::-1]  # noisiest first
    grid = tuple(ordered)
    if (
        state.grid is None
        and (before is None or before == grid)
        and (on_walk or (state.t in grid and state.t_prev in grid))
    ):
        pass  # (a walk from a lone latent, or back over the whole grid its start came from: nothing to merge)
    else:
        grid = tuple(sorted({*walked, state.t, state.t_prev, *(state.grid or ()), *(before or ())}, reverse=True))
    if type(state) is State:
        return State(state.x_prev, state.x, state.t_prev, state.t, state.coupled, grid, identity)
    return state.replace(grid=grid, solver=identity)


def _show(times: list[float]) -> str:
    return ", ".join(map(str, times)) if len(times) <= 4 else f"{times[0]}, {times[1]}, ..., {times[-1]}"


# ---------------------------------------------------------------------------------------------------- plans

_PLANS: OrderedDict[tuple, tuple[weakref.ref, weakref.ref, Solver, Plan]] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_MAX_PLANS = 32


def _kept(w: _Walk, model: Denoiser) -> tuple[tuple | None, Plan | None]:
    """The key of this walk's plan, and the plan kept for it by an earlier walk (``None`` if none is).

    The key is the walk as given: the model and the solver (by identity; and the model's schedule), the grid's times,
    the strength, the direction and the latent's shape, dtype and device. A kept plan was made by a
    walk that validated all of them, so a walk that finds one skips those checks: the one cache of the walk, bounded,
    holding no reference to the model; only for solvers whose plans stay valid (``cacheable``, asked by ``_plan``
    before it keeps one). ``None`` for a key
    where anything is not as a validated walk's (the walk then validates it and refuses)."""
    like = w.x.x if isinstance(w.x, State) else w.x
    ts = w.ts
    if (
        not isinstance(like, torch.Tensor)
        or not isinstance(ts, torch.Tensor)
        or ts.dtype is not torch.float64
        or ts.dim() != 1
    ):
        return None, None
    base = _unwrapped(model)
    strength = w.strength  # (with its type: True == 1.0 as a key, but True is refused as a strength)
    key = (id(base), id(w.solver), tuple(ts.tolist()), type(strength), strength, w.forward, like.shape, like.dtype,
           like.device)  # fmt: skip
    hit = _PLANS.get(key)  # (reads need no lock: one dict operation each; writers hold it)
    # (the entry holds the solver, so no other object has its id while it is kept; the model and its schedule it
    # holds weakly, and an id may then be a newer object's)
    if hit is None or hit[0]() is not base or hit[1]() is not getattr(base, "schedule", None):
        return key, None
    try:
        _PLANS.move_to_end(key)
    except KeyError:  # (another thread has just dropped it)
        pass
    return key, hit[3]


def _plan(
    model: Denoiser, solver: Any, walk: list[float], forward: bool, like: torch.Tensor, key: tuple | None
) -> Plan:
    """The solver's plan for this walk (``solver.plan``, else its own steps), kept under ``key`` (``_kept``) for the
    next walk with the same model, solver, grid, direction and kind of latent."""
    make = getattr(solver, "plan", None)
    plan = make(model, walk, forward, like) if make is not None else Stepping(solver, model, walk, forward)
    # (only plans that stay valid are kept: a walk looks a key up before asking)
    if key is not None and getattr(solver, "cacheable", False):
        base = _unwrapped(model)
        try:
            refs = weakref.ref(base), weakref.ref(base.schedule)
        except TypeError:  # a denoiser or schedule that cannot be weakly referenced is not cached
            return plan
        with _PLANS_LOCK:
            _PLANS[key] = (*refs, solver, plan)
            while len(_PLANS) > _MAX_PLANS:
                _PLANS.popitem(last=False)
    return plan


# ------------------------------------------------------------------------------------------- finite values

_HINT = (
    "check the model output, the schedule's end points (an epsilon model cannot give x0 where alpha = 0) and the "
    "state's dtype range"
)


class _FiniteCheck:
    """NaN or inf in a walk's latents, recorded step by step without a host sync per step; ``error`` names the
    first failing step.

    A solver whose walk carries every non-finite value into its final state declares ``nonfinite_persists = True``:
    each latent it makes is an affine combination that includes the latent it stepped from (a zero coefficient
    included, and IEEE arithmetic keeps NaN and inf: ``0 x inf = NaN``). BDIA, O-BELM, EDICT and the integrators do.
    Their walk does no per-step work for the check and needs no recorder (``every_step``): it sums the final state's
    newest latent once (both coupled copies), and a non-finite one is located by replaying the walk with a recorder
    (the failing walk pays for the replay; a finite one pays one reduction). Otherwise (``Exact``, whose integers do
    not carry NaN, or a solver that does not declare it) ``record`` writes one sum of the latent each step made into a
    buffer preallocated on the device, through ``out=``, so that the loop allocates nothing.

    Sums are taken in the latent's dtype (float32 for half precision, which could overflow where the latent does
    not): a float32 latent with finite elements is only reported if their sum passes 3e38, which no working walk
    approaches.
    """

    def __init__(self, walk: list[float], solver: object, like: torch.Tensor, *, replayed: bool = False):
        """``replayed``: the walk replays a failing one (for the message)."""
        self.walk, self.solver, self.replayed = walk, solver, replayed
        self.sums = torch.zeros(len(walk), 2, dtype=_sum_dtype(like), device=like.device)
        self._dims = tuple(range(like.dim()))

    @staticmethod
    def every_step(solver: object) -> bool:
        """Whether a walk of ``solver`` must record every step (it does not declare ``nonfinite_persists``)."""
        return not getattr(solver, "nonfinite_persists", False)

    def record(self, j: int, state: State, forward: bool) -> None:
        """After the step to ``walk[j]``: the latent it made (both, for coupled copies)."""
        if torch.is_grad_enabled() and (state.x.requires_grad or state.x_prev.requires_grad):
            with torch.no_grad():  # a check, not part of any graph (and out= is not differentiable)
                return self.record(j, state, forward)
        slot, dt = self.sums[j], self.sums.dtype  # (a view made per step: views kept for every step would grow with N)
        torch.sum(state.x if forward or state.coupled else state.x_prev, dim=self._dims, dtype=dt, out=slot[0])
        if state.coupled:
            torch.sum(state.x_prev, dim=self._dims, dtype=dt, out=slot[1])

    def failed(self) -> int | None:
        """The first failing step, or ``None`` if every recorded latent is finite."""
        bad = ~torch.isfinite(self.sums).all(dim=1)
        return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None  # the one host sync of the walk

    def error(self, j: int, state: State) -> FloatingPointError:
        """The error naming step ``j``."""
        return _nonfinite(self.walk, self.solver, state, j, self.replayed)

    def raise_if_bad(self, state: State) -> None:
        """Raise if a recorded step was not finite (``state``: the walk's last)."""
        j = self.failed()
        if j is not None:
            raise self.error(j, state)


def _nonfinite(walk: list[float], solver: object, state: State, j: int, replayed: bool) -> FloatingPointError:
    """The error naming step ``j`` of ``walk`` as the first that made NaN or inf (``-1``: a replay of a walk whose
    final state is not finite found no such step); ``state`` is the walk's last, for the solver's own hint."""
    describe = getattr(solver, "describe_nonfinite", None)
    hint = describe(state) if describe is not None else _HINT
    if j < 0:
        return FloatingPointError(
            "non-finite values (NaN or inf) in the walk's final state, but a replay of the walk with a check "
            f"after every step produced none: the model's output is not reproducible; {hint}"
        )
    how = " (located by replaying the walk with a check after every step)" if replayed else ""
    return FloatingPointError(
        f"non-finite values (NaN or inf) produced in step {j} of {len(walk) - 1} "
        f"(t = {walk[j - 1]} -> {walk[j]}){how}: {hint}"
    )


def _finite(*parts: torch.Tensor) -> bool:
    """Whether every element of ``parts`` is finite, read through one sum of sums (NaN or inf in any element makes
    it non-finite): one reduction per tensor, outside any graph, in its dtype (float32 for half precision:
    ``_sum_dtype``), no full-size boolean temporary, one host sync."""
    total = None
    for x in parts:
        x = x.detach() if x.requires_grad else x
        dtype = _sum_dtype(x)
        part = x.sum() if dtype is x.dtype else x.sum(dtype=dtype)  # (no dtype argument to parse where none is needed)
        total = part if total is None else total + part
    return math.isfinite(float(total))


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    """Half precision is summed in float32 (its own sum could overflow where the latent does not)."""
    return torch.float32 if x.element_size() < 4 else x.dtype


# -------------------------------------------------------------------------------------------------- helpers


def _facing(state: State, forward: bool) -> State:
    """A state as the walk reports it: ``x`` is the latent the walk ended on (``flipped`` leaves coupled copies)."""
    if forward or state.coupled:
        return state
    if type(state) is State:  # (the dataclass machinery of flipped costs as much as a step's Python)
        return State(state.x, state.x_prev, state.t, state.t_prev, False, state.grid, state.solver)
    return state.flipped()


def _stops(result: Any) -> bool:
    """Whether a callback's answer stops the walk: any true bool, numpy bool, int or one-element tensor does."""
    if result is None or result is False:
        return False
    if isinstance(result, bool | np.bool_ | numbers.Integral):
        return bool(result)
    if isinstance(result, torch.Tensor) and result.numel() == 1:
        return bool(result)
    raise TypeError(
        f"the callback returned {type(result).__name__}: return True (or a true numpy bool, int or one-element "
        "tensor) to stop the walk, None or False to go on"
    )


class _FirstEvaluation:
    """A denoiser that passes calls through and keeps the first one of each step (for the callback); it offers the
    model's ``prepare`` / ``predict`` where the model does, so that a plan's prepared path is kept."""

    def __init__(self, model: Denoiser):
        self.model, self.schedule, self.first = model, model.schedule, None
        self.plannable = getattr(model, "plannable", False)
        if self.plannable:
            self.prepare = model.prepare  # type: ignore[attr-defined]

    def predict(self, x: torch.Tensor, ready: Prepared, **kw: Any) -> Prediction:
        pred = self.model.predict(x, ready, **kw)  # type: ignore[attr-defined]
        if self.first is None:
            self.first = (x, pred)
        return pred

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        pred = self.model(x, t, **kw)
        if self.first is None:
            self.first = (x, pred)
        return pred


def _made_by(plan: Plan, solver: Solver) -> str | None:
    """The identity of the solver walking ``plan``: the plan's, computed once with it (the solver's own for a plan
    that does not carry it; a solver's ``identity`` may build its string at each call)."""
    made_by = getattr(plan, "identity", None)
    return getattr(solver, "identity", None) if made_by is None else made_by


def _unwrapped(model: Denoiser) -> Denoiser:
    """The user's denoiser behind the callback's recorder (what a kept plan belongs to)."""
    return model.model if isinstance(model, _FirstEvaluation) else model


def _check_model(model: object) -> None:
    schedule = getattr(model, "schedule", None)
    if not callable(model) or not isinstance(schedule, Schedule) or isinstance(model, type):
        raise TypeError(
            f"model must be a denoiser (an object with a bdia.schedules.Schedule as .schedule, called as "
            f"model(x, t) -> Prediction), e.g. bdia.models.Model(net, schedule, prediction); got "
            f"{model.__name__ if isinstance(model, type) else type(model).__name__}"
        )


def _check_solver(solver: object) -> None:
    if isinstance(solver, type):
        raise TypeError(f"solver must be an instance, e.g. {solver.__name__}(), got the class {solver.__name__}")
    if not all(callable(getattr(solver, m, None)) for m in _SOLVER_METHODS):  # (a Protocol isinstance costs 140 us)
        raise TypeError(
            f"solver must have init, step, unstep and amplification (e.g. bdia.solvers.BDIA()), got "
            f"{type(solver).__name__}"
        )


_SOLVER_METHODS = ("init", "step", "unstep", "amplification")


_LEAST_LIMIT = 16.0  # the lowest default threshold, whatever the dtype (see limits)


def limits(dtype: torch.dtype) -> tuple[float, float]:
    """The default refusal and warning thresholds of a walk's amplification for latents of ``dtype``: one rounding
    grown to 10% and to 1% of the data's scale, and at least 16 (half precision rounds each step by 0.05-0.4% anyway;
    a walk that amplifies less is as good as that precision allows)."""
    eps = torch.finfo(dtype).eps
    refuse = max(_LEAST_LIMIT, 0.1 / eps)
    return refuse, min(refuse, max(_LEAST_LIMIT, 0.01 / eps))


def _check_amplification(a: float, solver: Solver, forward: bool, dtype: torch.dtype, limit: float | None) -> None:
    if limit is None and a <= _LEAST_LIMIT:
        return  # (no default threshold is below it)
    refuse, warn = limits(dtype)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int | float) or not limit >= 1:
            raise ValueError(
                f"max_amplification must be a number >= 1 (or None for the dtype's default), got {limit!r}"
            )
        refuse = warn = limit
    what = "sampling" if forward else "inversion"
    if a > refuse:
        raise ValueError(
            f"this {what} walk with {solver!r} can amplify rounding errors by up to {a:.3g} (one rounding grown that "
            f"much, an estimate on unit Gaussian data), past {refuse:.3g} (max_amplification; by default 10% of the "
            f"data's scale in {dtype}): use gamma "
            "closer to 1, another grid, float64 or the exact mode (bdia.exact.Exact), or pass max_amplification= "
            "to run it anyway (docs/theory.md, 'Rounding')"
        )
    if a > warn:
        eps = torch.finfo(dtype).eps
        warnings.warn(
            f"this {what} walk with {solver!r} can grow one rounding error {a:.3g}-fold, to about {a * eps:.2g} of the "
            f"data's scale in {dtype} (an estimate that does not see the network's own growth); pass "
            "max_amplification= to silence this",
            RuntimeWarning,
            stacklevel=4,
        )
