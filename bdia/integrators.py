"""One-step integrators ``Phi(x; t -> s)`` of the probability-flow ODE ``dx/dt = alpha'(t) x0 + sigma'(t) eps``.

An integrator is a map from a latent at ``t`` to one at ``s``, given the model's prediction at its start (which a
reversible solver shares between its forward and backward steps). A single-evaluation integrator is affine,
``Phi = A x + B x0 + C eps``, and only says its three float64 numbers (``coefficients``); a multi-stage one
(Heun) overrides ``__call__``. An integrator is also a one-step solver: ``step`` ignores the pair's older latent
and ``unstep`` is the classic approximate inversion (DDIM inversion).

Clean data (sigma = 0) has no noise to predict: where a step starts at sigma = 0 (inverting data on a grid that
ends there) the prediction is ``x0 = x`` and the noise the model predicts for ``x`` at the step's other end,
``s`` (as diffusers' ``DDIMInverseScheduler`` evaluates eps(x_k, t_{k+1})); the network is never called where it
was not trained (sigma = 0, or ``t = -1`` of a discrete schedule).
"""

from __future__ import annotations

from typing import Any

import torch

from bdia._linalg import lincomb, scaled
from bdia.models import Denoiser, Prediction
from bdia.schedules import Schedule
from bdia.state import State

__all__ = ["DDIM", "Euler", "Heun", "Integrator", "predict"]


def predict(model: Denoiser, x: torch.Tensor, t: float, s: float, **kw: Any) -> Prediction:
    """The model's ``(x0, eps)`` at ``(x, t)``; at clean data (sigma(t) = 0): ``x0 = x`` and eps evaluated at ``s``."""
    if model.schedule.at(t).sigma > 0:
        return model(x, t, **kw)
    return Prediction(x, model(x, s, **kw).eps)


class Integrator:
    """A one-step map ``Phi(x; t -> s)`` that can reuse the prediction at its start. ``order``; ``nfe`` per step."""

    order: int
    nfe: int  # model evaluations per step, the one at the start point included

    def coefficients(self, schedule: Schedule, t: float, s: float) -> tuple[float, float, float]:
        """``(A, B, C)`` with ``Phi(x; t -> s) = A x + B x0 + C eps``: three float64 numbers of the times alone,
        for a step that uses only the prediction at its start."""
        raise NotImplementedError(f"{self!r} is not affine in (x, x0, eps): it evaluates the model more than once")

    @property
    def affine(self) -> bool:
        """Whether the step is ``A x + B x0 + C eps`` (the integrator implements ``coefficients``)."""
        return type(self).coefficients is not Integrator.coefficients

    @property
    def first_order(self) -> Integrator:
        """The first-order step that uses only the evaluation at the start (BDIA's default backward step)."""
        return self

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        """``Phi(x; t -> s)`` (a fresh tensor); ``pred``: the prediction at ``(x, t)`` if already evaluated."""
        if pred is None:
            pred = predict(model, x, t, s, **kw)
        A, B, C = self.coefficients(model.schedule, t, s)
        return lincomb((A, x), *scaled(B, pred._x0_terms), *scaled(C, pred._eps_terms))

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        return State(x, self(model, x, t, t_next, **kw), t, t_next)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        return self.init(model, _pair(state, self).x, state.t, t_next, **kw)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        # Not an exact inverse: the classic (DDIM-style) inversion evaluates the model at the front of
        # the inversion walk, state.x_prev, instead of at the unknown point it is solving for.
        x, t = _pair(state, self).x_prev, state.t_prev
        return State(self(model, x, t, t_prev, **kw), x, t_prev, t)

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """A one-step scheme carries no older latent: nothing is amplified beyond the ODE's own flow."""
        return 1.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _pair(state: State, solver: object) -> State:
    if state.coupled:
        raise ValueError(
            f"{solver!r} continues a pair of consecutive points, got coupled copies at one time "
            f"(t = {state.t}), made by EDICT: continue an EDICT state with EDICT"
        )
    return state


class Euler(Integrator):
    """Explicit Euler on ``dx/dt = alpha'(t) x0 + sigma'(t) eps`` in the schedule's native time. Order 1, 1 NFE.

    For EDM (alpha = 1, sigma = t) and rectified flow it coincides with DDIM; for VP in native time it does not.
    """

    order, nfe = 1, 1

    def coefficients(self, schedule: Schedule, t: float, s: float) -> tuple[float, float, float]:
        k, h = schedule.at(t), s - t
        return 1.0, h * k.dalpha, h * k.dsigma


class DDIM(Integrator):
    """DDIM (Song et al. 2021, eq. 12 with eta = 0): ``alpha(s) x0 + sigma(s) eps``. Order 1, 1 NFE.

    The exact solution of the scaled ODE ``d(x/alpha)/d(sigma/alpha) = eps`` when eps is held constant.
    """

    order, nfe = 1, 1

    def coefficients(self, schedule: Schedule, t: float, s: float) -> tuple[float, float, float]:
        k = schedule.at(s)
        return 0.0, k.alpha, k.sigma


class Heun(Integrator):
    """Heun's method (Karras et al. 2022, Algorithm 1, in its general alpha/sigma form). Order 2, 2 NFE.

    An Euler predictor in native time, then the trapezoidal average of the slopes at both ends; a step
    that ends at sigma = 0 keeps the Euler step (so N steps to sigma = 0 cost 2N - 1 evaluations).
    """

    order, nfe = 2, 2

    @property
    def first_order(self) -> Integrator:
        return Euler()

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        if pred is None:
            pred = predict(model, x, t, s, **kw)
        euler = Euler()(model, x, t, s, pred)
        ks = model.schedule.at(s)
        if ks.sigma == 0:
            return euler
        k, h = model.schedule.at(t), s - t
        end = model(euler, s, **kw)
        return lincomb(
            (1.0, x),
            (0.5 * h * k.dalpha, pred.x0),
            (0.5 * h * k.dsigma, pred.eps),
            (0.5 * h * ks.dalpha, end.x0),
            (0.5 * h * ks.dsigma, end.eps),
        )
