"""``sample`` and ``invert``: thin loops of a solver's ``step`` / ``unstep`` over a time grid."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from bdia.models import Denoiser, Prediction
from bdia.schedules import Schedule, check_grid
from bdia.solvers import Solver
from bdia.state import State, check_latent, check_state

__all__ = ["FiniteCheck", "Start", "Step", "begin", "invert", "sample"]


class Step:
    """What a callback sees after each step: ``i`` (steps taken on the grid so far), the step's times ``t`` ->
    ``t_next`` (in the walk's direction), ``state`` (the state after the step, oriented as the walk returns it),
    ``x`` (the latent of the step's first model evaluation, at ``t``) and ``x0`` (that evaluation's prediction of
    the clean data, built on first access). Return ``True`` from the callback to stop the walk after this step: it
    then returns ``state``."""

    __slots__ = ("_pred", "i", "state", "t", "t_next", "x")

    def __init__(self, i: int, t: float, t_next: float, state: State, x: torch.Tensor, pred: Prediction):
        self.i, self.t, self.t_next, self.state, self.x, self._pred = i, t, t_next, state, x, pred

    @property
    def x0(self) -> torch.Tensor:
        return self._pred.x0

    def __repr__(self) -> str:
        return f"Step(i={self.i}, t={self.t}, t_next={self.t_next})"


Callback = Callable[[Step], bool | None]


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
    ``model_kwargs`` go to every model call (conditioning). No autograd graph is recorded unless ``grad=True``
    (for gradients at constant memory see ``bdia.gradients.sample_with_grad``). ``callback(step)`` runs after
    every step (see ``Step``) and stops the walk by returning ``True``. ``check_finite`` refuses a non-finite
    input before any model call and raises, naming the first failing step, if a step produced NaN or inf (for the
    family's solvers one reduction of the final latent, and a replay of a failing walk; see ``FiniteCheck``).
    ``max_amplification``: see ``begin``.
    """
    return _walk(
        model, x, ts, solver, True, strength, grad, progress, callback, check_finite, max_amplification, model_kwargs
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
    editing). With a one-step integrator as ``solver`` this is classic approximate DDIM-style inversion. The
    keywords are those of ``sample``.
    """
    return _walk(
        model, x, ts, solver, False, strength, grad, progress, callback, check_finite, max_amplification, model_kwargs
    )


class Start(NamedTuple):
    """A walk ready to run: its grid in walk order, the state at its front (``x`` the walk's current latent,
    oriented as ``step``/``unstep`` expect), and ``k``, the index of the grid time that ``state`` has reached."""

    grid: list[float]
    state: State | None
    k: int


def begin(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Solver,
    *,
    forward: bool = True,
    strength: float | None = None,
    check_finite: bool = True,
    max_amplification: float | None = None,
    init: bool = True,
    **model_kwargs: Any,
) -> Start:
    """Validate a walk and take its first step if it starts from a lone latent: everything before the loop.

    With ``init=False`` a lone latent is validated but not stepped (``state`` is then ``None``, ``k`` 0).

    Refused before any model call: a model that is not a denoiser, a solver that is not one, a bad grid, a
    non-finite input (``check_finite``), a state that does not continue the grid or that the solver cannot continue,
    and a walk whose ``solver.amplification`` of rounding errors exceeds ``max_amplification`` (default
    ``1 / eps`` of the latent's dtype: past it, rounding alone can reach the scale of the data; docs/theory.md).
    """
    _check_model(model)
    _check_solver(solver)
    grid = check_grid(ts, model.schedule)
    grid = _strength(grid, strength)
    latent = check_state(x, "x").x if isinstance(x, State) else check_latent(x)
    if check_finite and not _finite(*([x] if isinstance(x, torch.Tensor) else [x.x_prev, x.x])):
        raise FloatingPointError("non-finite values (NaN or inf) in the input x")
    _check_amplification(solver, model.schedule, grid, forward, latent.dtype, max_amplification)
    walk = grid if forward else grid[::-1]
    if not init and not isinstance(x, State):
        return Start(walk, None, 0)
    if isinstance(x, State):
        state, where = x, "x (a bdia.State)"
    else:
        state, where = solver.init(model, x, walk[0], walk[1], **model_kwargs), "the solver's first step"
    if state.t_prev < state.t:
        state = state.flipped()  # sampling orientation: x_prev the noisier point
    front, other = (state.t, state.t_prev) if forward else (state.t_prev, state.t)
    if front == walk[0]:
        k = 0
    elif front == walk[1] and other == walk[0]:
        k = 1
    else:
        raise ValueError(
            f"{where} holds times ({state.t_prev}, {state.t}) that do not continue this grid "
            f"(which {'samples' if forward else 'inverts'} from t={walk[0]} via t={walk[1]}): "
            "pass the grid that made it"
        )
    return Start(walk, state, k)


def _walk(
    model, x, ts, solver, forward, strength, grad, progress, callback, check_finite, limit, kw, every_step=None
) -> State:
    recorder = None
    if callback is not None:
        _check_model(model)  # (before wrapping it)
        recorder = _FirstEvaluation(model)
    with torch.set_grad_enabled(grad):
        grid, state, k = begin(
            recorder or model,
            x,
            ts,
            solver,
            forward=forward,
            strength=strength,
            check_finite=check_finite,
            max_amplification=limit,
            **kw,
        )
        n = len(grid) - 1
        check = FiniteCheck(grid, solver, state.x, every_step, replayed=every_step is True) if check_finite else None

        def after(j: int) -> bool:
            """Record and report the step that reached ``grid[j]``; True: the callback stops the walk."""
            if check is not None:
                check.record(j, state, forward)
            if callback is None:
                return False
            return callback(Step(j, grid[j - 1], grid[j], _facing(state, forward), *recorder.first)) is True

        # the solver's init took the first step from a lone latent
        watch = callback is not None or (check is not None and check.every_step)  # (else nothing to do per step)
        stop = watch and k == 1 and isinstance(x, torch.Tensor) and after(1)
        move, denoiser = solver.step if forward else solver.unstep, recorder or model
        # (tqdm is built only when shown: even disabled it costs a few steps' worth of a short walk)
        bar = tqdm(total=n, initial=k, desc="sample" if forward else "invert") if progress else None
        with bar or contextlib.nullcontext():
            for j in range(k + 1, n + 1):
                if stop:
                    break
                if recorder is not None:
                    recorder.reset()
                state = move(denoiser, state, grid[j], **kw)
                if bar is not None:
                    bar.update()
                if watch:
                    stop = after(j)
    if check is not None:
        j = check.failed(state, forward)
        if j == -1:
            # the final state is not finite: replay without the callback, recording every step, to name the first
            # failing one (the replay raises; if it does not, the model did not reproduce its output)
            _walk(model, x, ts, solver, forward, strength, False, False, None, True, limit, kw, every_step=True)
        if j is not None:
            raise check.error(j, state)
    return _facing(state, forward)


_HINT = (
    "check the model output, the schedule's end points (an epsilon model cannot give x0 where alpha = 0) and the "
    "state's dtype range"
)


class FiniteCheck:
    """NaN or inf in a walk's latents, found without a host sync per step; ``raise_if_bad`` names the first
    failing step.

    A solver whose walk carries every non-finite value into its final state declares ``nonfinite_persists =
    True``: each latent it makes is an affine combination that includes the latent it stepped from (a zero
    coefficient included, and IEEE arithmetic keeps NaN and inf: ``0 x inf = NaN``). BDIA, O-BELM, EDICT and the
    integrators do. Their walk does no per-step work for the check: ``failed`` sums the final state's newest
    latent once (both coupled copies), and a non-finite one is located by ``bdia.sample`` replaying the walk with
    a check after every step (the failing walk pays for the replay; a finite one pays one reduction). Otherwise
    (``Exact``, whose integers do not carry NaN, or a solver that does not declare it) ``record`` writes one sum
    of the latent each step made into a buffer preallocated on the device, through ``out=``, so that the loop
    allocates nothing (small allocations between the step's large ones cost the CPU allocator more than the
    arithmetic).

    Sums are taken in the latent's dtype (float32 for half precision, which could overflow where the latent does
    not): a float32 latent with finite elements is only reported if their sum passes 3e38, which no working walk
    approaches.
    """

    def __init__(
        self,
        grid: list[float],
        solver: object,
        like: torch.Tensor,
        every_step: bool | None = None,
        *,
        replayed: bool = False,
    ):
        """``every_step``: ``None`` decides by the solver; ``replayed``: the walk replays a failing one (message)."""
        self.grid, self.solver, self.replayed = grid, solver, replayed
        self.every_step = not getattr(solver, "nonfinite_persists", False) if every_step is None else every_step
        if self.every_step:
            self.sums = torch.zeros(len(grid), 2, dtype=_sum_dtype(like), device=like.device)
            self._dims = tuple(range(like.dim()))

    def record(self, j: int, state: State, forward: bool) -> None:
        """After the step to ``grid[j]``: the latent it made (both, for coupled copies)."""
        if not self.every_step:
            return
        if torch.is_grad_enabled() and (state.x.requires_grad or state.x_prev.requires_grad):
            with torch.no_grad():  # a check, not part of any graph (and out= is not differentiable)
                return self.record(j, state, forward)
        slot, dt = self.sums[j], self.sums.dtype  # (a view made per step: views kept for every step would grow with N)
        torch.sum(state.x if forward or state.coupled else state.x_prev, dim=self._dims, dtype=dt, out=slot[0])
        if state.coupled:
            torch.sum(state.x_prev, dim=self._dims, dtype=dt, out=slot[1])

    def failed(self, state: State, forward: bool = True) -> int | None:
        """The first failing step (``state``: the walk's last); ``None`` if every latent is finite; ``-1`` if the
        final state is not finite but the steps were not recorded (the walk must be replayed to name the step).
        Unrecorded, the newest latent of a pair is read (it includes the one before it), or both coupled copies."""
        if self.every_step:
            bad = ~torch.isfinite(self.sums).all(dim=1)
            return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None  # the one host sync of the walk
        if state.coupled:
            return None if _finite(state.x, state.x_prev) else -1
        return None if _finite(state.x if forward else state.x_prev) else -1

    def error(self, j: int, state: State) -> FloatingPointError:
        """The error naming step ``j`` (``-1``: a replay found no failing step)."""
        g = self.grid
        describe = getattr(self.solver, "describe_nonfinite", None)
        hint = describe(state) if describe is not None else _HINT
        if j < 0:
            return FloatingPointError(
                "non-finite values (NaN or inf) in the walk's final state, but a replay of the walk with a check "
                f"after every step produced none: the model's output is not reproducible; {hint}"
            )
        how = " (located by replaying the walk with a check after every step)" if self.replayed else ""
        return FloatingPointError(
            f"non-finite values (NaN or inf) produced in step {j} of {len(g) - 1} (t = {g[j - 1]} -> {g[j]}){how}: "
            f"{hint}"
        )

    def raise_if_bad(self, state: State) -> None:
        """Raise if a step was not finite (for a walk recorded step by step; ``bdia.sample`` also replays)."""
        j = self.failed(state)
        if j is not None:
            raise self.error(j, state)


def _finite(*parts: torch.Tensor) -> bool:
    """Whether every element of ``parts`` is finite, read through one sum of sums (NaN or inf in any element makes
    it non-finite): one reduction per tensor, no full-size boolean temporary, one host sync."""
    total = None
    for p in parts:
        p = p.detach() if p.requires_grad else p
        total = p.sum(dtype=_sum_dtype(p)) if total is None else total + p.sum(dtype=_sum_dtype(p))
    return math.isfinite(float(total))


def _sum_dtype(x: torch.Tensor) -> torch.dtype:
    """Half precision is summed in float32 (its own sum could overflow where the latent does not)."""
    return torch.float32 if x.element_size() < 4 else x.dtype


def _facing(state: State, forward: bool) -> State:
    """A state as the walk reports it: ``x`` is the latent the walk ended on (``flipped`` leaves coupled copies)."""
    return state if forward else state.flipped()


class _FirstEvaluation:
    """A denoiser that passes calls through and keeps the first one of each step (for the callback)."""

    def __init__(self, model: Denoiser):
        self.model, self.schedule, self.first = model, model.schedule, None

    def reset(self) -> None:
        self.first = None

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        pred = self.model(x, t, **kw)
        if self.first is None:
            self.first = (x, pred)
        return pred


def _strength(grid: list[float], strength: float | None) -> list[float]:
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


def _check_amplification(solver, schedule, grid, forward, dtype, limit) -> None:
    if limit is None:
        limit = 1.0 / torch.finfo(dtype).eps
    elif isinstance(limit, bool) or not isinstance(limit, int | float) or not limit >= 1:
        raise ValueError(f"max_amplification must be a number >= 1 (or None for the dtype's default), got {limit!r}")
    a = solver.amplification(schedule, grid, forward)
    if a > limit:
        raise ValueError(
            f"this {'sampling' if forward else 'inversion'} walk with {solver!r} can amplify rounding errors by up to "
            f"{a:.3g}, past {limit:.3g} (max_amplification; by default 1/eps of {dtype}), where rounding alone can "
            "reach the scale of the data: use gamma closer to 1, another grid, float64 or the exact mode "
            "(bdia.exact.Exact), or pass max_amplification= to run it anyway (docs/theory.md)"
        )
