"""``sample`` and ``invert``: thin loops of ``step`` / ``unstep`` over a time grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from bdia.models import Denoiser
from bdia.schedules import check_grid
from bdia.state import State, check_latent, check_state

__all__ = ["invert", "sample"]


def sample(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Any,
    *,
    progress: bool = False,
    callback: Callable[[State], None] | None = None,
    check_finite: bool = True,
    **model_kwargs: Any,
) -> State:
    """Integrate from ``ts[0]`` (noisiest) to ``ts[-1]``; returns ``State(x_prev, x)`` with ``x`` the sample.

    ``x`` is a latent at ``ts[0]`` or a ``State`` from ``invert`` over the same grid (whose pair is then
    continued, never regenerated), or from an earlier ``sample`` ending at ``ts[0]``.
    ``model_kwargs`` go to every model call (conditioning). ``callback(state)`` runs after every step.
    ``check_finite`` raises if a non-finite value appears (checked on the device, one sync at the end).
    """
    return _walk(model, x, ts, solver, True, progress, callback, check_finite, model_kwargs)


def invert(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Any,
    *,
    progress: bool = False,
    callback: Callable[[State], None] | None = None,
    check_finite: bool = True,
    **model_kwargs: Any,
) -> State:
    """Walk the same grid backwards, from ``ts[-1]`` to ``ts[0]``; returns ``State(x_prev, x)``, ``x`` at ``ts[0]``.

    ``x`` is data at ``ts[-1]`` (a real image: its first step is one plain integrator step, the only
    approximation of an exact solver) or a ``State`` returned by ``sample`` over the same grid (then the
    inversion is exact up to rounding). Inverting over ``ts[k:]`` is partial inversion (editing strength).
    With a one-step integrator as ``solver`` this is classic approximate DDIM-style inversion.
    """
    return _walk(model, x, ts, solver, False, progress, callback, check_finite, model_kwargs)


def _walk(model, x, ts, solver, forward, progress, callback, check_finite, kw) -> State:
    grid = check_grid(ts, getattr(model, "schedule", None))
    if not forward:
        grid = grid[::-1]
    stepped = isinstance(x, torch.Tensor)  # a lone latent: the solver's init may take the first step
    bad_input = ~torch.isfinite(x).all() if check_finite and stepped else None
    state, k = _begin(model, x, grid, solver, forward, kw)
    stepped = stepped and k == 1
    if check_finite:
        bad = _nonfinite(state) if bad_input is None else bad_input | _nonfinite(state)
        # where the first failure happened, kept on the device: -2 the input, -1 the state at grid[k]
        first_bad = (
            torch.where(bad, -1, len(grid))
            if bad_input is None
            else torch.where(bad_input, -2, torch.where(bad, -1, len(grid)))
        )
    if callback is not None:
        callback(_facing(state, forward))
    move = solver.step if forward else solver.unstep
    with tqdm(total=len(grid) - 1, initial=k, disable=not progress, desc="sample" if forward else "invert") as bar:
        for i, t in enumerate(grid[k + 1 :]):
            state = move(model, state, t, **kw)
            if check_finite:
                now = _nonfinite(state, forward)
                first_bad = torch.where(now & ~bad, i, first_bad)
                bad = bad | now
            if callback is not None:
                callback(_facing(state, forward))
            bar.update()
    if check_finite and bool(bad):
        at = int(first_bad)
        j = k + 1 + at  # the grid index the failing step went to
        if at == -2 or (at == -1 and not stepped):
            where = "in the input"
        else:
            where = f"in step {j} of {len(grid) - 1} (t = {grid[j - 1]} -> {grid[j]})"
        raise FloatingPointError(
            f"non-finite values (NaN or inf) produced {where}: check the model output, the schedule's end "
            "points (an epsilon model cannot give x0 where alpha = 0) and the state's dtype range"
        )
    return _facing(state, forward)


def _facing(state: State, forward: bool) -> State:
    """A state in sampling orientation (``x_prev`` the noisier point), as the walk reports it: ``x`` is the
    latent the walk ended on. A pair of latents at one time (EDICT) keeps its order."""
    return state if forward or state.t_prev == state.t else state.flipped()


def _nonfinite(state: State, forward: bool | None = None) -> torch.Tensor:
    """True (on the device) if a latent of ``state`` is not finite. After a step (``forward`` given) only the
    latent that step made is read, since the other was checked as the previous step's; a pair at one time
    (EDICT) is new on both sides."""
    if forward is None or state.t_prev == state.t:
        return ~(torch.isfinite(state.x).all() & torch.isfinite(state.x_prev).all())
    return ~torch.isfinite(state.x if forward else state.x_prev).all()


def _begin(model, x, grid: list[float], solver, forward: bool, kw) -> tuple[State, int]:
    """Turn the input into a state in sampling orientation (``x_prev`` the noisier point) and find where
    on ``grid`` (the walk's order) its front lies: index 0, or 1 when its other point is ``grid[0]``."""
    if isinstance(x, State):
        state = check_state(x, "x")
        where = "x (a bdia.State)"
    else:
        x = check_latent(x)
        state = solver.init(model, x, grid[0], grid[1], **kw)
        where = "the solver's first step"
    if state.t_prev < state.t:
        state = state.flipped()
    front, other = (state.t, state.t_prev) if forward else (state.t_prev, state.t)
    if front == grid[0]:
        return state, 0
    if front == grid[1] and other == grid[0]:
        return state, 1
    raise ValueError(
        f"{where} holds times ({state.t_prev}, {state.t}) that do not continue this grid "
        f"(which {'samples' if forward else 'inverts'} from t={grid[0]} via t={grid[1]}): pass the grid that made it"
    )
