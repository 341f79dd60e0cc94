"""What ``bdia.sample`` and ``bdia.invert`` need of a solver and of a walk's plan: two small protocols.

A *solver* offers three pure functions of a denoiser, a state and the grid times:

- ``init(model, x, t, t_next, **kw)``: start a walk from a lone latent at ``t`` (returns a ``bdia.State``);
- ``step(model, state, t_next, **kw)``: advance to ``t_next``;
- ``unstep(model, state, t_prev, **kw)``: the inverse of ``step``, back to ``t_prev``;

and ``amplification(schedule, times, forward)``: an estimate of how many units of rounding the walk over ``times``
(sampling order) leaves in its result, checked before any network call (docs/theory.md, "Rounding"). It may also
declare ``nonfinite_persists = True`` (NaN or inf in any latent of its walk stays in the final state, so the walk
checks that state once instead of every step), an ``identity`` (a string naming its scheme, stamped on the states
it makes; see ``bdia.solvers.identity``) and ``plan(model, walk, forward, like)``, which turns one walk into a
``Plan`` computed once (``bdia.solvers.BDIA`` precomputes every step's coefficients there).

A *plan* runs one walk: ``walk`` (its grid in walk order), ``amplification`` (of this walk), ``identity`` (the
solver's, stamped on the walk's result), ``init(model, x, kw)``
(the first step from a lone latent at ``walk[0]``) and ``step(model, state, j, kw, into=None)`` (from ``walk[j - 1]``
to ``walk[j]``, either direction; ``into``: ``None``, or two tensors the walk owns, ``(scratch, dead)``, a scratch
tensor and the latent the step drops, which the step may write its intermediate and its result into).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from bdia.schedules import Schedule
from bdia.state import State

__all__ = ["Plan", "Solver", "Stepping"]


class Solver(Protocol):
    """What ``bdia.sample`` / ``bdia.invert`` (and ``sample_with_grad``) need of a solver."""

    nfe: int
    order: int

    def init(self, model: Any, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State: ...

    def step(self, model: Any, state: State, t_next: float, **kw: Any) -> State: ...

    def unstep(self, model: Any, state: State, t_prev: float, **kw: Any) -> State: ...

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float: ...


class Plan(Protocol):
    """One walk of a solver, prepared before its first network call."""

    walk: list[float]
    amplification: float
    identity: str | None

    def init(self, model: Any, x: torch.Tensor, kw: dict[str, Any]) -> State: ...

    def step(self, model: Any, state: State, j: int, kw: dict[str, Any], into: torch.Tensor | None = None) -> State: ...


class Stepping:
    """The plan of a solver that offers none: its own ``init``, ``step`` and ``unstep`` at each time of the walk,
    and its ``amplification`` of this walk."""

    __slots__ = ("amplification", "forward", "identity", "solver", "walk")

    def __init__(self, solver: Any, model: Any, walk: list[float], forward: bool):
        self.solver, self.walk, self.forward = solver, walk, forward
        self.identity = getattr(solver, "identity", None)
        self.amplification = solver.amplification(model.schedule, walk if forward else walk[::-1], forward)

    def init(self, model: Any, x: torch.Tensor, kw: dict[str, Any]) -> State:
        return self.solver.init(model, x, self.walk[0], self.walk[1], **kw)

    def step(self, model: Any, state: State, j: int, kw: dict[str, Any], into: tuple | None = None) -> State:
        move = self.solver.step if self.forward else self.solver.unstep
        return move(model, state, self.walk[j], **kw)
