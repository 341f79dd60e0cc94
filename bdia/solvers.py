"""Integrators (one-step maps) and reversible solvers (BDIA) on an explicit ``State``.

Every solver offers three pure functions of a denoiser, a state and the grid times:

- ``init(model, x, t, t_next)``: start a walk from a lone latent at ``t`` (returns a state);
- ``step(model, state, t_next)``: advance to ``t_next`` (returns ``State(state.x, x_next, state.t, t_next)``);
- ``unstep(model, state, t_prev)``: the inverse of ``step``: rebuild the point at ``t_prev`` that came
  before ``state.x_prev`` (returns ``State(x_rebuilt, state.x_prev, t_prev, state.t_prev)``).

An integrator is itself a (one-step) solver: its ``step`` ignores ``x_prev`` and its ``unstep`` is the
classic approximate inversion (one integrator step from the front of the inversion walk).
Each integrator writes its step as a list of ``(coefficient, tensor)`` terms, so that a wrapper such
as BDIA can fuse its whole update into a single linear combination with float64 coefficients.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from bdia.linalg import Coef, Terms, lincomb, scaled
from bdia.models import Denoiser, Prediction
from bdia.schedules import Schedule
from bdia.state import State

__all__ = ["BDIA", "DDIM", "EDICT", "OBELM", "Euler", "Heun", "Integrator", "Terms", "obelm_gamma"]

GammaFn = Callable[[Schedule, float, float, float], float]


class Integrator(ABC):
    """A one-step map ``Phi(x; t -> s)`` of the probability-flow ODE that can reuse an evaluation at its start."""

    order: int
    nfe: int  # model evaluations per step, the one at the start point included

    @abstractmethod
    def terms(self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction, **kw: Any) -> Terms:
        """``Phi(x; t -> s)`` as terms of a linear combination, given the prediction ``pred`` at ``(x, t)``."""

    @property
    def first_order(self) -> Integrator:
        """The first-order step that uses only the evaluation at the start (BDIA's default backward step)."""
        return self

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        if pred is None:
            pred = model(x, t, **kw)
        return lincomb(*self.terms(model, x, t, s, pred, **kw))

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        return State(x, self(model, x, t, t_next, **kw), t, t_next)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        return self.init(model, state.x, state.t, t_next, **kw)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        # Not an exact inverse: the classic (DDIM-style) inversion evaluates the model at the front of
        # the inversion walk, state.x_prev, instead of at the unknown point it is solving for.
        return State(self(model, state.x_prev, state.t_prev, t_prev, **kw), state.x_prev, t_prev, state.t_prev)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Euler(Integrator):
    """Explicit Euler on ``dx/dt = alpha'(t) x0 + sigma'(t) eps`` in the schedule's native time. Order 1, 1 NFE.

    For EDM (alpha = 1, sigma = t) and rectified flow it coincides with DDIM; for VP in native time it does not.
    """

    order, nfe = 1, 1

    def terms(self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction, **kw: Any) -> Terms:
        k, h = model.schedule.at(t), s - t
        return [(1.0, x), *scaled(h * k.dalpha, pred.x0_terms), *scaled(h * k.dsigma, pred.eps_terms)]


class DDIM(Integrator):
    """DDIM (Song et al. 2021, eq. 12 with eta = 0): ``alpha(s) x0 + sigma(s) eps``. Order 1, 1 NFE.

    The exact solution of the scaled ODE ``d(x/alpha)/d(sigma/alpha) = eps`` when eps is held constant.
    """

    order, nfe = 1, 1

    def terms(self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction, **kw: Any) -> Terms:
        k = model.schedule.at(s)
        return [*scaled(k.alpha, pred.x0_terms), *scaled(k.sigma, pred.eps_terms)]


class Heun(Integrator):
    """Heun's method (Karras et al. 2022, Algorithm 1, in its general alpha/sigma form). Order 2, 2 NFE.

    An Euler predictor in native time, then the trapezoidal average of the slopes at both ends; a step
    that ends at sigma = 0 keeps the Euler step (so N steps to sigma = 0 cost 2N - 1 evaluations).
    """

    order, nfe = 2, 2

    @property
    def first_order(self) -> Integrator:
        return Euler()

    def terms(self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction, **kw: Any) -> Terms:
        euler = Euler().terms(model, x, t, s, pred)
        ks = model.schedule.at(s)
        if ks.sigma == 0:
            return euler
        k, h = model.schedule.at(t), s - t
        end = model(lincomb(*euler), s, **kw)
        return [
            (1.0, x),
            *scaled(0.5 * h * k.dalpha, pred.x0_terms),
            *scaled(0.5 * h * k.dsigma, pred.eps_terms),
            *scaled(0.5 * h * ks.dalpha, end.x0_terms),
            *scaled(0.5 * h * ks.dsigma, end.eps_terms),
        ]


def obelm_gamma(schedule: Schedule, t_prev: float, t: float, t_next: float) -> float:
    """O-BELM (Wang et al. 2024) as a per-step BDIA gamma (NOTES section 3).

    In scaled time ``sbar = sigma/alpha`` with ``h_i = sbar(t) - sbar(t_next)`` and
    ``h_{i+1} = sbar(t_prev) - sbar(t)``: ``gamma_i = (h_i / h_{i+1})^2 alpha(t_next) / alpha(t_prev)``.
    """
    sb = schedule.snr_sbar
    h_i, h_ip1 = sb(t) - sb(t_next), sb(t_prev) - sb(t)
    if math.isinf(h_ip1):  # the previous point is pure noise (alpha = 0): no usable history
        return 0.0
    return (h_i / h_ip1) ** 2 * schedule.at(t_next).alpha / schedule.at(t_prev).alpha


class BDIA:
    """BDIA (Zhang, Lewis & Kleijn, ECCV 2024, arXiv 2307.10829, eq. 14): an exactly invertible two-step scheme.

    ``x_next = Phi(x; t -> t_next) + gamma (x_prev - Phi_b(x; t -> t_prev))`` and its inverse
    ``x_prev = Phi_b(x; t -> t_prev) + (x_next - Phi(x; t -> t_next)) / gamma``.

    ``integrator`` is ``Phi``; ``backward`` is ``Phi_b``, by default the integrator's first-order step that
    reuses the shared evaluation at ``x`` (so BDIA over DDIM or Euler costs 1 NFE per step, over Heun 2).
    ``gamma`` is a float in [0, 1], a per-sample tensor of shape ``(batch,)`` with values in [0, 1], or a
    per-step function ``gamma(schedule, t_prev, t, t_next) -> float >= 0`` (e.g. ``obelm_gamma``).
    gamma = 0 is the plain integrator; gamma = 1 the paper's default. Order: that of a leapfrog-type scheme
    (2) for gamma = 1 over DDIM on smooth grids, 1 for constant gamma < 1. Inversion divides by gamma: its
    rounding errors grow like ``gamma^-N`` (NOTES section 4), and inverting with gamma = 0 is an error.
    """

    def __init__(
        self,
        integrator: Integrator | None = None,
        gamma: float | torch.Tensor | GammaFn = 1.0,
        backward: Integrator | None = None,
    ):
        self.integrator = DDIM() if integrator is None else integrator
        if not isinstance(self.integrator, Integrator):
            raise TypeError(f"integrator must be a bdia.solvers.Integrator, got {type(self.integrator).__name__}")
        self.backward = self.integrator.first_order if backward is None else backward
        if not isinstance(self.backward, Integrator):
            raise TypeError(f"backward must be a bdia.solvers.Integrator, got {type(self.backward).__name__}")
        if isinstance(gamma, bool) or (not isinstance(gamma, int | float | torch.Tensor) and not callable(gamma)):
            raise TypeError(f"gamma must be a float, a (batch,) tensor or a function, got {type(gamma).__name__}")
        if isinstance(gamma, int | float):
            gamma = float(gamma)
            _check_gamma(gamma)
        elif isinstance(gamma, torch.Tensor):
            if gamma.dim() != 1 or not gamma.is_floating_point():
                raise ValueError(
                    f"a gamma tensor must be 1-D floating point (one per sample), got {gamma.dtype} "
                    f"of shape {tuple(gamma.shape)}"
                )
            lo, hi = float(gamma.min()), float(gamma.max())  # once, at construction (not in the step loop)
            _check_gamma(lo), _check_gamma(hi)
            self._gamma_min = lo
            self._gamma_on: dict[torch.device, torch.Tensor] = {}  # a copy per device: no copy in the step loop
        self.gamma = gamma
        self.nfe = self.integrator.nfe + self.backward.nfe - 1
        # The nominal order on smooth grids: gamma = 1 with the same method both ways is a symmetric
        # (leapfrog-type) two-step scheme and O-BELM's gamma cancels the step-ratio error, both order 2;
        # any other gamma > 0 keeps a first-order correction term (measured: BDIA(Heun) with its default
        # Euler backward step is order 1).
        if isinstance(gamma, float) and gamma == 0:
            self.order = self.integrator.order
        elif (isinstance(gamma, float) and gamma == 1 and type(self.backward) is type(self.integrator)) or (
            gamma is obelm_gamma
        ):
            self.order = max(2, self.integrator.order)
        else:
            self.order = 1

    def _gamma_at(self, model: Denoiser, x: torch.Tensor, t_prev: float, t: float, t_next: float) -> Coef:
        g = self.gamma
        if isinstance(g, float):
            return g
        if isinstance(g, torch.Tensor):
            if g.shape[0] != x.shape[0]:
                raise ValueError(f"gamma has {g.shape[0]} entries but the batch has {x.shape[0]} samples")
            on = self._gamma_on.get(x.device)
            if on is None:
                on = self._gamma_on[x.device] = g.to(device=x.device, dtype=torch.float64)
            return on.reshape(-1, *([1] * (x.dim() - 1)))
        value = g(model.schedule, t_prev, t, t_next)
        if isinstance(value, torch.Tensor):
            return value
        value = float(value)
        # A per-step schedule may exceed 1 (O-BELM does on some grids): stability is set by
        # a = gamma alpha(t_prev) / alpha(t_next), not by gamma alone, so only sign and finiteness are checked.
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"gamma({t_prev}, {t}, {t_next}) returned {value}; expected a finite number >= 0")
        return value

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        """A walk starts with one plain integrator step (there is no earlier point to correct with)."""
        return self.integrator.init(model, x, t, t_next, **kw)

    def drift(
        self, model: Denoiser, x: torch.Tensor, t_prev: float, t: float, t_next: float, **kw: Any
    ) -> tuple[Coef, torch.Tensor]:
        """``(gamma, F)`` with ``x_next = gamma x_prev + F(x)``: the split that makes the step invertible.

        ``F(x) = Phi(x; t -> t_next) - gamma Phi_b(x; t -> t_prev)`` is one fused linear combination (a fresh
        tensor), computed with the same terms in the same order by ``step`` and ``unstep``: the same bits both
        ways, so a round trip only sees the rounding of ``gamma x_prev + F`` and its inverse, never that of F.
        """
        g = self.gamma if type(self.gamma) is float else self._gamma_at(model, x, t_prev, t, t_next)
        pred = model(x, t, **kw)
        forward = self.integrator.terms(model, x, t, t_next, pred, **kw)
        back = self.backward.terms(model, x, t, t_prev, pred, **kw)
        return g, lincomb(*forward, *scaled(-g, back))

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        g, F = self.drift(model, state.x, state.t_prev, state.t, t_next, **kw)
        x_prev = state.x_prev
        x_next = F.addcmul_(x_prev, g.to(F.dtype)) if isinstance(g, torch.Tensor) else F.add_(x_prev, alpha=g)
        return State(state.x, x_next, state.t, t_next)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        x, t = state.x_prev, state.t_prev  # the shared point x_i
        if isinstance(self.gamma, torch.Tensor) and self._gamma_min == 0:
            raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
        g, F = self.drift(model, x, t_prev, t, state.t, **kw)
        if isinstance(g, float) and g == 0:
            raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
        diff = torch.sub(state.x, F)
        if isinstance(g, torch.Tensor):
            diff.div_(g.to(diff.dtype))
        elif g != 1.0:
            diff.div_(g)
        x_prev = diff
        return State(x_prev, x, t_prev, t)

    def __repr__(self) -> str:
        g = getattr(self.gamma, "__name__", self.gamma)
        return f"BDIA({self.integrator!r}, gamma={g}, backward={self.backward!r})"


def _check_gamma(g: float, where: str = "") -> None:
    if not (0.0 <= g <= 1.0):
        raise ValueError(f"gamma must lie in [0, 1]{where}, got {g} (gamma > 1 makes sampling unstable)")


class OBELM(BDIA):
    """O-BELM (Wang et al., NeurIPS 2024, "BELM"): the minimum-local-error bidirectional explicit linear
    multistep sampler, as BDIA over DDIM with the per-step ``gamma_i`` of ``obelm_gamma`` (NOTES section 3).
    Order 2, 1 NFE per step; the first step is a plain DDIM step.

    Its gamma_i can be far below 1 (0.004 on the last step of a 20-step SD grid), so its inversion
    amplifies rounding like ``prod_i 1/gamma_i``: exact in exact arithmetic, fragile in floating point.
    """

    def __init__(self) -> None:
        super().__init__(DDIM(), gamma=obelm_gamma)
        self.order = 2

    def __repr__(self) -> str:
        return "OBELM()"


class EDICT:
    """EDICT (Wallace, Gokul & Naik, CVPR 2023, eqs. 10-13): two coupled copies with mixing, exactly invertible.
    Order 1 (over DDIM), 2 NFE per step.

    From ``(x, y)`` at ``t`` to ``s``, with ``Phi_e(z)`` the integrator's step of ``z`` taking the noise
    prediction ``e`` as its eps (and ``x0 = (z - sigma_t e) / alpha_t``)::

        x' = Phi_{eps(y, t)}(x)        y' = Phi_{eps(x', t)}(y)       (the second call is at the START time t)
        x_s = p x' + (1 - p) y'        y_s = p y' + (1 - p) x_s

    and the inverse runs the four lines backwards (the same two model calls). With eps held, a
    single-evaluation integrator's step is affine in ``z``, ``Phi_e(z) = A z + B e``, which is what makes
    it invertible: ``integrator`` may be DDIM (the paper) or Euler, not a multi-stage one such as Heun.
    ``p`` in (0, 1]: the mixing weight (the paper's 0.93; 1 turns mixing off, which lets the copies drift).

    State: both copies live at the same time, ``State(x_prev=y, x=x, t_prev=t, t=t)``; the output latent
    (the sample of ``bdia.sample``, the inverted noise of ``bdia.invert``) is ``state.x``. ``init`` sets
    ``x = y`` and takes no step.
    """

    nfe, order = 2, 1

    def __init__(self, integrator: Integrator | None = None, p: float = 0.93):
        self.integrator = DDIM() if integrator is None else integrator
        if not isinstance(self.integrator, Integrator):
            raise TypeError(f"integrator must be a bdia.solvers.Integrator, got {type(self.integrator).__name__}")
        if self.integrator.nfe != 1:
            raise ValueError(
                f"EDICT needs a single-evaluation integrator (DDIM or Euler), got {self.integrator!r} with "
                f"{self.integrator.nfe} evaluations per step: its step is not affine in the latent for a fixed eps"
            )
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise TypeError(f"p must be a float in (0, 1], got {type(p).__name__}")
        p = float(p)
        if not (0.0 < p <= 1.0):
            raise ValueError(f"p must lie in (0, 1] (the mixing weight; the paper uses 0.93), got {p}")
        self.p = p

    def _affine(self, model: Denoiser, z: torch.Tensor, t: float, s: float, eps: torch.Tensor) -> tuple[float, float]:
        """``(A, B)`` with ``Phi(z; t -> s) = A z + B eps`` when the prediction's eps is ``eps``: the integrator's
        terms are read off by tensor identity, with ``x0 = (z - sigma_t eps) / alpha_t`` substituted."""
        k = model.schedule.at(t)
        x0 = z.new_empty(0)  # a marker: a single-evaluation integrator only weighs the prediction
        A, B = 0.0, 0.0
        for c, T in self.integrator.terms(model, z, t, s, Prediction(x0, eps)):
            if isinstance(c, torch.Tensor):
                raise TypeError("EDICT needs float coefficients from its integrator, got a tensor")
            if T is z:
                A += c
            elif T is eps:
                B += c
            elif T is x0:
                A, B = A + c / k.alpha, B - c * k.sigma / k.alpha
            else:
                raise ValueError(
                    f"{self.integrator!r} is not a linear combination of x, x0 and eps: EDICT cannot use it"
                )
        return A, B

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        """Both copies start as ``x`` (the paper's ``x_T = y_T``); no step is taken."""
        return State(x, x, t, t)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        y, x, t = state.x_prev, state.x, _same_time(state)
        p = self.p
        e = model(y, t, **kw).eps
        A, B = self._affine(model, x, t, t_next, e)
        x_mid = lincomb((A, x), (B, e))
        y_mid = lincomb((A, y), (B, model(x_mid, t, **kw).eps))
        x_new = lincomb((p, x_mid), (1.0 - p, y_mid))
        return State(lincomb((p, y_mid), (1.0 - p, x_new)), x_new, t_next, t_next)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        y_new, x_new, s = state.x_prev, state.x, _same_time(state)
        inv = 1.0 / self.p
        y_mid = lincomb((inv, y_new), (-(1.0 - self.p) * inv, x_new))
        x_mid = lincomb((inv, x_new), (-(1.0 - self.p) * inv, y_mid))
        e = model(x_mid, t_prev, **kw).eps
        A, B = self._affine(model, y_mid, t_prev, s, e)
        y = lincomb((1.0 / A, y_mid), (-B / A, e))
        e = model(y, t_prev, **kw).eps
        return State(y, lincomb((1.0 / A, x_mid), (-B / A, e)), t_prev, t_prev)

    def __repr__(self) -> str:
        return f"EDICT({self.integrator!r}, p={self.p})"


def _same_time(state: State) -> float:
    if state.t_prev != state.t:
        raise ValueError(
            f"an EDICT state holds two copies at one time, got times ({state.t_prev}, {state.t}): "
            "continue it only with EDICT (a state from another solver is a pair of consecutive points)"
        )
    return state.t
