"""Where a pair sits on a walk and how much of a grid a partial walk takes: the one place this package asks.

The schedulers and the pipeline functions ask these two questions and nothing else about a grid's bookkeeping;
``cut`` and ``locate`` answer them with the core's meaning (``bdia.sampling``).
"""

from __future__ import annotations

from bdia.state import State, check_state


def cut(grid: list[float], strength: float | None) -> list[float]:
    """The last ``int(strength * N)`` steps of an N-step grid (noisiest first), as diffusers' img2img counts them;
    ``None``: the whole grid."""
    if strength is None:
        return grid
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(
            f"strength must be a number in (0, 1] (the share of the grid's steps to walk), got {strength!r}"
        )
    n = len(grid) - 1
    k = min(int(n * strength), n)
    if k < 1:
        raise ValueError(f"strength={strength} walks int({n} * {strength}) = 0 of the grid's {n} steps; use more")
    return grid[n - k :]


def locate(state: State, walk: list[float], *, name: str = "state") -> tuple[State, int]:
    """Where ``state`` sits on ``walk`` (a grid in walk order: noisiest first to sample, reversed to invert).

    Returns the state as solvers take it (sampling orientation: ``x_prev`` the noisier point) and ``k``, the index
    in ``walk`` of the point the walk has reached (the later of the pair's two points in walk order). Refuses a
    pair that is not two consecutive points of the walk.
    """
    check_state(state, name)
    if state.coupled:
        raise ValueError(f"{name} holds coupled copies (EDICT) at one time, not a pair of consecutive grid points")
    where = {t: i for i, t in enumerate(walk)}
    a, b = where.get(state.t_prev), where.get(state.t)
    if a is None or b is None or abs(a - b) != 1:
        raise ValueError(
            f"{name} holds times ({state.t_prev}, {state.t}), not two consecutive points of this walk "
            f"({walk[0]}, {walk[1]}, ..., {walk[-1]})"
        )
    oriented = state if state.t_prev > state.t else state.flipped()
    return oriented, max(a, b)
