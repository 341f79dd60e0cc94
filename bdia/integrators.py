"""One-step integrators ``Phi(x; t -> s)`` of the probability-flow ODE ``dx/dt = alpha'(t) x0 + sigma'(t) eps``.

An integrator is a map from a latent at ``t`` to one at ``s``, given the model's prediction at its start (which a
reversible solver shares between its forward and backward steps). A single-evaluation integrator is affine,
``Phi = A x + B x0 + C eps``, and only says its three float64 numbers (``coefficients``); a multi-stage one
(Heun, ScaledHeun, DPMSolver2) overrides ``__call__``. An integrator is also a one-step solver: ``step`` ignores the
pair's older latent and ``unstep`` is the classic approximate inversion (DDIM inversion; ``DDIMInverse`` is the
variant that editing pipelines run, with the model evaluated at each inversion step's destination).

Second-order integrators: ``Heun`` (Karras et al. 2022) steps in the schedule's native time; ``ScaledHeun`` (the
trapezoidal rule) and ``DPMSolver2`` (Lu et al. 2022, the midpoint in log-SNR) step the scaled ODE
``d(x/alpha)/d(sigma/alpha) = eps``, in which DDIM is exact for a constant eps; so are they, and a step to sigma = 0
keeps DDIM's step.

Clean data (sigma = 0) has no noise to predict: where a step starts at sigma = 0 (inverting data on a grid that
ends there) the prediction is ``x0 = x`` and the noise the model predicts for ``x`` at the step's other end,
``s`` (as diffusers' ``DDIMInverseScheduler`` evaluates eps(x_k, t_{k+1})); the network is never called where it
was not trained (sigma = 0, or ``t = -1`` of a discrete schedule).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from bdia._linalg import lincomb
from bdia.models import Denoiser, Prediction
from bdia.schedules import Schedule
from bdia.state import State, _pair

__all__ = ["DDIM", "DDIMInverse", "DPMSolver2", "Euler", "Heun", "Integrator", "ScaledHeun", "predict"]


def predict(model: Denoiser, x: torch.Tensor, t: float, s: float, **kw: Any) -> Prediction:
    """The model's ``(x0, eps)`` at ``(x, t)``; at clean data (sigma(t) = 0): ``x0 = x`` and eps evaluated at ``s``."""
    if model.schedule.at(t).sigma > 0:
        return model(x, t, **kw)
    return Prediction(x, model(x, s, **kw).eps)


class Integrator:
    """A one-step map ``Phi(x; t -> s)`` that can reuse the prediction at its start. ``order``; ``nfe`` per step."""

    order: int
    nfe: int  # model evaluations per step, the one at the start point included
    nonfinite_persists = True  # each step's result includes x (the walk checks its final state once)

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
        scale, T = pred.factored(A, x, B, C)
        return T if scale == 1.0 else T.mul_(scale)

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


class DDIMInverse(DDIM):
    """DDIM inversion as editing pipelines run it: diffusers' ``DDIMInverseScheduler`` driven by ``unet(x_k, t_{k+1})``
    (and Mokady et al.'s null-text inversion). Order 1, 1 NFE.

    A step towards more noise (``s > t``: ``init`` and ``unstep`` of an inversion) takes the noise the model predicts
    for ``x_k`` at the step's DESTINATION ``t_{k+1}``, ``e = eps(x_k, t_{k+1})``, and moves along it as DDIM does,
    ``x_{k+1} = alpha_{k+1} (x_k - sigma_k e) / alpha_k + sigma_{k+1} e``; ``DDIM().unstep`` (Song et al.'s
    inversion) evaluates at the start ``t_k`` instead. Measured on the analytic mixtures, the destination variant is
    the more accurate (docs/benchmarks.md). Towards less noise it is DDIM. For an epsilon network this is diffusers'
    step exactly; for a v network diffusers turns the output at ``t_{k+1}`` into a noise with the coefficients of
    ``t_k``, while here the model's own eps at ``t_{k+1}`` is used. As the backward step inside BDIA (which shares
    one evaluation per step) it is DDIM: BDIA uses only ``coefficients``.
    """

    @property
    def first_order(self) -> Integrator:
        return DDIM()

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        if s <= t:
            return super().__call__(model, x, t, s, pred, **kw)
        k, ks = model.schedule.at(t), model.schedule.at(s)
        e = model(x, s, **kw)
        return lincomb((ks.alpha / k.alpha, x), *e.terms(0.0, ks.sigma - ks.alpha * k.sigma / k.alpha))


def _second_order(
    model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None, mid: float, weight: float, kw
) -> torch.Tensor:
    """``DDIM(x; eps_t) + c (sigma_s - alpha_s sbar_t) (eps(u, mid) - eps_t)``, ``u = DDIM(x; t -> mid)``: the
    scaled-time second-order step shared by ScaledHeun (``mid = s``, ``c = 1/2``) and DPM-Solver-2 (``mid`` the
    log-SNR midpoint, ``c = 1``). ``weight`` is ``c``."""
    if pred is None:
        pred = predict(model, x, t, s, **kw)
    ddim = DDIM()(model, x, t, s, pred)
    k, ks = model.schedule.at(t), model.schedule.at(s)
    if ks.sigma == 0 or k.alpha == 0:
        # sbar = 0 at the end (log-SNR infinite) or infinite at the start: no second slope to average; DDIM's step
        return ddim
    u = ddim if mid == s else DDIM()(model, x, t, mid, pred)
    c = weight * (ks.sigma - ks.alpha * k.sigma / k.alpha)
    return lincomb((1.0, ddim), *model(u, mid, **kw).terms(0.0, c), *pred.terms(0.0, -c))


class ScaledHeun(Integrator):
    """Heun's method (the explicit trapezoidal rule) on the scaled ODE ``d xbar / d sbar = eps``, ``xbar = x/alpha``,
    ``sbar = sigma/alpha``. Order 2, 2 NFE.

    Predictor: the Euler step in scaled time, which is DDIM's step; corrector: the mean of the slopes at both ends,
    ``x_s = alpha_s (xbar_t + (sbar_s - sbar_t) (eps_t + eps(x_pred, s)) / 2)``. Exact when eps is constant (as DDIM
    is), so it stays on ``alpha(s) x0 + sigma(s) eps`` where native-time ``Heun`` overshoots a long last step of a
    discrete VP grid. A step that ends at sigma = 0 (or starts at alpha = 0) keeps DDIM's step, as ``Heun`` keeps
    Euler's: N steps to sigma = 0 cost 2N - 1 evaluations. Its first-order step (BDIA's default backward) is DDIM.
    For EDM and rectified flow it equals ``Heun``.
    """

    order, nfe = 2, 2

    @property
    def first_order(self) -> Integrator:
        return DDIM()

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        return _second_order(model, x, t, s, pred, s, 0.5, kw)


class DPMSolver2(Integrator):
    """DPM-Solver-2 (Lu et al., NeurIPS 2022, Algorithm 1 with r1 = 1/2), in its noise-prediction form. Order 2, 2 NFE.

    With ``lambda = log(alpha/sigma)`` and ``h = lambda_s - lambda_t``: a DDIM step to ``s1``, the time whose
    ``lambda`` is ``lambda_t + h/2`` (the geometric mean of ``sbar``), then
    ``x_s = (alpha_s/alpha_t) x - sigma_s (e^h - 1) eps_1``, ``eps_1 = eps(u_1, s1)``: the step of DDIM with the
    noise taken at the log-SNR midpoint. ``s1`` is found by bisection on the schedule's ``sbar`` (the schedule need
    not invert its own time). Exact when eps is constant; a step with an end at sigma = 0 or alpha = 0 (``h``
    infinite: the last step to clean data, the first from pure noise or from data) keeps DDIM's step. Its
    first-order step (BDIA's default backward) is DDIM.
    """

    order, nfe = 2, 2

    @property
    def first_order(self) -> Integrator:
        return DDIM()

    def midpoint(self, schedule: Schedule, t: float, s: float) -> float:
        """The time between ``t`` and ``s`` whose ``sbar = sigma/alpha`` is ``sqrt(sbar_t sbar_s)`` (lambda's
        midpoint), by bisection to the last bit (about 60 halvings of a float64 interval)."""
        target = math.log(schedule.snr_sbar(t) * schedule.snr_sbar(s)) / 2
        lo, hi = min(t, s), max(t, s)  # sbar increases with t
        m = 0.5 * (lo + hi)
        for _ in range(200):
            m = 0.5 * (lo + hi)
            if m in (lo, hi):
                break
            if math.log(schedule.snr_sbar(m)) < target:
                lo = m
            else:
                hi = m
        return m

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        sch = model.schedule
        if 0 in (sch.at(s).sigma, sch.at(t).sigma, sch.at(s).alpha, sch.at(t).alpha):
            # an end at sbar = 0 or infinity: lambda has no midpoint; DDIM's step
            if pred is None:
                pred = predict(model, x, t, s, **kw)
            return DDIM()(model, x, t, s, pred)
        return _second_order(model, x, t, s, pred, self.midpoint(sch, t, s), 1.0, kw)
