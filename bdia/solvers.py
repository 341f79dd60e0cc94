"""Integrators (one-step maps) and reversible solvers (BDIA) on an explicit ``State``.

Every solver offers three pure functions of a denoiser, a state and the grid times:

- ``init(model, x, t, t_next)``: start a walk from a lone latent at ``t`` (returns a state);
- ``step(model, state, t_next)``: advance to ``t_next`` (returns ``State(state.x, x_next, state.t, t_next)``);
- ``unstep(model, state, t_prev)``: the inverse of ``step``: rebuild the point at ``t_prev`` that came
  before ``state.x_prev`` (returns ``State(x_rebuilt, state.x_prev, t_prev, state.t_prev)``).

An integrator is itself a (one-step) solver: its ``step`` ignores ``x_prev`` and its ``unstep`` is the
classic approximate inversion (one integrator step from the front of the inversion walk).
Each integrator writes its step as a list of ``(coefficient, tensor)`` terms, so that a wrapper such
as BDIA can fuse its whole update into a single linear combination with float64 coefficients. A
single-evaluation integrator (Euler, DDIM) is affine in ``(x, x0, eps)`` and gives just its three
coefficients, from which BDIA precomputes its whole step once per grid point.
"""

from __future__ import annotations

import math
from abc import ABC
from collections.abc import Callable
from typing import Any

import torch

from bdia.linalg import Coef, Terms, factored, lincomb, scaled
from bdia.models import Denoiser, Prediction
from bdia.schedules import Schedule
from bdia.state import State

__all__ = ["BDIA", "DDIM", "EDICT", "OBELM", "Euler", "Heun", "Integrator", "Terms", "obelm_gamma"]

GammaFn = Callable[[Schedule, float, float, float], float]


class Integrator(ABC):
    """A one-step map ``Phi(x; t -> s)`` of the probability-flow ODE that can reuse an evaluation at its start.

    A single-evaluation integrator implements ``coefficients``; a multi-stage one (Heun) implements ``terms``.
    """

    order: int
    nfe: int  # model evaluations per step, the one at the start point included

    def coefficients(self, schedule: Schedule, t: float, s: float) -> tuple[float, float, float]:
        """``(A, B, C)`` with ``Phi(x; t -> s) = A x + B x0 + C eps``, for a step that uses only the prediction
        ``(x0, eps)`` at its start: three float64 numbers that depend on the times alone."""
        raise NotImplementedError(f"{self!r} is not affine in (x, x0, eps): it evaluates the model more than once")

    @property
    def affine(self) -> bool:
        """Whether the step is ``A x + B x0 + C eps`` (the integrator implements ``coefficients``)."""
        return type(self).coefficients is not Integrator.coefficients

    def terms(self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction, **kw: Any) -> Terms:
        """``Phi(x; t -> s)`` as terms of a linear combination, given the prediction ``pred`` at ``(x, t)``."""
        A, B, C = self.coefficients(model.schedule, t, s)
        return [(A, x), *scaled(B, pred.x0_terms), *scaled(C, pred.eps_terms)]

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
        # Both maps affine in (x, x0, eps): the whole step is three numbers per grid point, computed once
        self._affine = self.integrator.affine and self.backward.affine
        self._plans: dict[tuple, tuple[Coef, Coef, Coef]] = {}
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

        ``F(x) = Phi(x; t -> t_next) - gamma Phi_b(x; t -> t_prev)``, one fused linear combination (a fresh
        tensor). ``step`` and ``unstep`` use it factored, ``F = s T`` (``split``).
        """
        g, s, T = self.split(model, x, t_prev, t, t_next, **kw)
        return g, (T if s == 1.0 else T.mul_(s))

    def split(
        self, model: Denoiser, x: torch.Tensor, t_prev: float, t: float, t_next: float, **kw: Any
    ) -> tuple[Coef, Coef, torch.Tensor]:
        """``(gamma, s, T)`` with ``F = s T`` (``bdia.linalg.factored``): one model evaluation at ``(x, t)``.

        ``step`` and ``unstep`` compute T with the same terms in the same order, so T has the same bits both
        ways and ``s T`` enters both through add's ``alpha`` (one fused multiply-add per element, or the same
        rounded product): a round trip sees only the rounding of ``gamma x_prev + s T`` and its inverse.
        """
        g = self.gamma if type(self.gamma) is float else self._gamma_at(model, x, t_prev, t, t_next)
        pred = model(x, t, **kw)
        if self._affine:
            A, B, C = self._plan(model.schedule, t_prev, t, t_next, g)
            return g, *factored((A, x), *scaled(B, pred.x0_terms), *scaled(C, pred.eps_terms))
        forward = self.integrator.terms(model, x, t, t_next, pred, **kw)
        back = self.backward.terms(model, x, t, t_prev, pred, **kw)
        return g, *factored(*forward, *scaled(-g, back))

    def _plan(self, schedule: Schedule, t_prev: float, t: float, t_next: float, g: Coef) -> tuple[Coef, Coef, Coef]:
        """F's coefficients on ``(x, x0, eps)``: the forward map's minus gamma times the backward map's."""
        key = (schedule, t_prev, t, t_next, g) if isinstance(g, float) else None
        plan = self._plans.get(key) if key else None
        if plan is None:
            f = self.integrator.coefficients(schedule, t, t_next)
            b = self.backward.coefficients(schedule, t, t_prev)
            plan = (f[0] - g * b[0], f[1] - g * b[1], f[2] - g * b[2])
            if key and len(self._plans) < 1 << 16:
                self._plans[key] = plan
        return plan

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        g, s, T = self.split(model, state.x, state.t_prev, state.t, t_next, **kw)
        x_prev = state.x_prev
        if isinstance(g, torch.Tensor):
            x_next = torch.mul(x_prev, g.to(x_prev.dtype)).add_(T, alpha=s)
        elif g == 1.0:
            x_next = _plus(x_prev, s, T)  # two passes over memory for the whole step
        elif g == 0.0:
            x_next = T.mul_(s)  # the plain integrator's update, to the bit
        else:
            x_next = _plus(x_prev, s / g, T).mul_(g)  # g (x_prev + (s/g) T): three passes, one allocation
        return State(state.x, x_next, state.t, t_next)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        x, t = state.x_prev, state.t_prev  # the shared point x_i
        if isinstance(self.gamma, torch.Tensor) and self._gamma_min == 0:
            raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
        g, s, T = self.split(model, x, t_prev, t, state.t, **kw)
        if isinstance(g, float) and g == 0:
            raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
        if isinstance(g, torch.Tensor):
            x_prev = _plus(state.x, -s, T).div_(g.to(T.dtype))
        elif g == 1.0:
            x_prev = _plus(state.x, -s, T)
        else:  # the step's g (x_prev + (s/g) T) undone in reverse order, (s/g) T the same product both ways
            x_prev = torch.div(state.x, g).add_(T, alpha=-s / g)
        return State(x_prev, x, t_prev, t)

    def __repr__(self) -> str:
        g = getattr(self.gamma, "__name__", self.gamma)
        return f"BDIA({self.integrator!r}, gamma={g}, backward={self.backward!r})"


def _plus(y: torch.Tensor, s: float, T: torch.Tensor) -> torch.Tensor:
    """``y + s T`` written over ``T``, a fresh intermediate: it saves an allocation, which on CPU costs as much as
    a pass over a small latent. Autograd refuses ``out=``, so a recorded step allocates."""
    if torch.is_grad_enabled() and (y.requires_grad or T.requires_grad):
        return torch.add(y, T, alpha=s)
    return torch.add(y, T, alpha=s, out=T)


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
        if not self.integrator.affine:
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

    def _affine(self, schedule: Schedule, t: float, s: float) -> tuple[float, float]:
        """``(A, B)`` with ``Phi_e(z; t -> s) = A z + B e`` for a noise prediction ``e``: the integrator's
        coefficients with ``x0 = (z - sigma_t e) / alpha_t`` substituted."""
        k = schedule.at(t)
        a, b, c = self.integrator.coefficients(schedule, t, s)
        return a + b / k.alpha, c - b * k.sigma / k.alpha

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        """Both copies start as ``x`` (the paper's ``x_T = y_T``); no step is taken."""
        return State(x, x, t, t, coupled=True)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        y, x, t = state.x_prev, state.x, _same_time(state)
        p = self.p
        e = model(y, t, **kw).eps
        A, B = self._affine(model.schedule, t, t_next)
        x_mid = lincomb((A, x), (B, e))
        y_mid = lincomb((A, y), (B, model(x_mid, t, **kw).eps))
        x_new = lincomb((p, x_mid), (1.0 - p, y_mid))
        return State(lincomb((p, y_mid), (1.0 - p, x_new)), x_new, t_next, t_next, coupled=True)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        y_new, x_new, s = state.x_prev, state.x, _same_time(state)
        inv = 1.0 / self.p
        y_mid = lincomb((inv, y_new), (-(1.0 - self.p) * inv, x_new))
        x_mid = lincomb((inv, x_new), (-(1.0 - self.p) * inv, y_mid))
        e = model(x_mid, t_prev, **kw).eps
        A, B = self._affine(model.schedule, t_prev, s)
        y = lincomb((1.0 / A, y_mid), (-B / A, e))
        e = model(y, t_prev, **kw).eps
        return State(y, lincomb((1.0 / A, x_mid), (-B / A, e)), t_prev, t_prev, coupled=True)

    def __repr__(self) -> str:
        return f"EDICT({self.integrator!r}, p={self.p})"


def _same_time(state: State) -> float:
    if not state.coupled:
        raise ValueError(
            f"EDICT continues coupled copies at one time (a state made by EDICT), got a pair of consecutive points at "
            f"times ({state.t_prev}, {state.t}), made by another solver"
        )
    return state.t
