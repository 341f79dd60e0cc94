"""Reversible solvers (BDIA, O-BELM, EDICT) on an explicit ``State``, and the ``Solver`` protocol they share.

Every solver offers three pure functions of a denoiser, a state and the grid times:

- ``init(model, x, t, t_next)``: start a walk from a lone latent at ``t`` (returns a state);
- ``step(model, state, t_next)``: advance to ``t_next``;
- ``unstep(model, state, t_prev)``: the inverse of ``step``, back to ``t_prev``;

and ``amplification(schedule, times, forward)``: how much the walk over ``times`` can amplify a rounding error,
checked before any network call. A solver may also declare ``nonfinite_persists = True`` when NaN or inf in
any latent of its walk stays in the walk's final state; ``bdia.sample`` then checks that state once instead
of every step (see ``bdia.sampling.FiniteCheck``). The integrators of ``bdia.integrators`` (Euler, DDIM,
DDIMInverse, Heun, ScaledHeun, DPMSolver2) are one-step solvers and are re-exported here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from bdia._linalg import factored, factored2, lincomb
from bdia.gamma import BoundedOBELM, Gamma, GammaFn, as_gamma, obelm_gamma
from bdia.integrators import DDIM, DDIMInverse, DPMSolver2, Euler, Heun, Integrator, ScaledHeun, _pair
from bdia.models import Denoiser, fold
from bdia.schedules import PerSchedule, Schedule
from bdia.state import State

__all__ = [
    "BDIA",
    "DDIM",
    "EDICT",
    "OBELM",
    "BoundedOBELM",
    "DDIMInverse",
    "DPMSolver2",
    "Drift",
    "EDICTState",
    "Euler",
    "Heun",
    "Integrator",
    "ScaledHeun",
    "Solver",
    "obelm_gamma",
]


@runtime_checkable
class Solver(Protocol):
    """What ``bdia.sample`` / ``bdia.invert`` (and ``sample_with_grad``) need of a solver."""

    nfe: int
    order: int

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State: ...

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State: ...

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State: ...

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float: ...


class Drift(NamedTuple):
    """BDIA's update split as ``x_next = gamma x_prev + F`` with ``F = scale T``.

    ``T`` is computed once per evaluation, from the same terms in the same order whichever way the walk goes, so
    it has the same bits in ``step`` and ``unstep``, and ``scale T`` enters both through add's ``alpha``: a round
    trip sees only the rounding of ``gamma x_prev + F`` and of its inverse. ``forward`` and ``inverse`` may write
    over ``T`` (a fresh tensor): use a drift once.
    """

    gamma: float | torch.Tensor  # python float, or float64 per sample shaped to broadcast
    scale: float
    T: torch.Tensor

    def tensor(self) -> torch.Tensor:
        """``F`` itself (a fresh tensor; ``T`` is kept)."""
        return self.T * self.scale if self.scale != 1.0 else self.T.clone()

    def forward(self, x_prev: torch.Tensor) -> torch.Tensor:
        """``gamma x_prev + F``."""
        g, s, T = self
        if type(g) is float and g == 1.0:
            return _plus(x_prev, s, T)  # two passes over memory for the whole gamma = 1 step
        if isinstance(g, torch.Tensor):
            return torch.mul(x_prev, g.to(x_prev.dtype)).add_(T, alpha=s)
        if g == 0.0:
            return T.mul_(s)  # the plain integrator's update, to the bit
        return _plus(x_prev, s / g, T).mul_(g)  # g (x_prev + (s/g) T): three passes, one allocation

    def inverse(self, x_next: torch.Tensor) -> torch.Tensor:
        """``(x_next - F) / gamma``: the exact inverse of ``forward`` in exact arithmetic."""
        g, s, T = self
        if isinstance(g, torch.Tensor):
            return _plus(x_next, -s, T).div_(g.to(T.dtype))
        if g == 1.0:
            return _plus(x_next, -s, T)
        # forward's g (x_prev + (s/g) T) undone in reverse order, (s/g) T the same product both ways
        return torch.div(x_next, g).add_(T, alpha=-s / g)


def _plus(y: torch.Tensor, s: float, T: torch.Tensor) -> torch.Tensor:
    """``y + s T`` written over ``T``, a fresh intermediate: it saves an allocation, which on CPU costs as much as
    a pass over a small latent. Autograd refuses ``out=``, so a recorded step allocates."""
    if (y.requires_grad or T.requires_grad) and torch.is_grad_enabled():
        return torch.add(y, T, alpha=s)
    return torch.add(y, T, alpha=s, out=T)


class BDIA:
    """BDIA (Zhang, Lewis & Kleijn, ECCV 2024, arXiv 2307.10829, eq. 14): an exactly invertible two-step scheme.

        x_next = gamma x_prev + F(x),   F(x) = Phi(x; t -> t_next) - gamma Phi_b(x; t -> t_prev)     (step)
        x_prev = (x_next - F(x)) / gamma                                                            (unstep)

    ``integrator`` is ``Phi``; ``backward`` is ``Phi_b``, by default the integrator's first-order step that reuses
    the shared evaluation at ``x`` (so BDIA over DDIM or Euler costs 1 NFE per step, over Heun 2). ``gamma``: a
    float in [0, 1], a ``(batch,)`` tensor of them, a per-step function ``gamma(schedule, t_prev, t, t_next)``
    (e.g. ``obelm_gamma``), or a ``bdia.gamma.Gamma``. gamma = 0 is the plain integrator; gamma = 1 the symmetric
    scheme. Order: 2 for gamma = 1 with the same method both ways (a leapfrog-type scheme) and for O-BELM's gamma,
    else the lower of the integrator's and the backward step's (1 with the default first-order backward step).
    Inversion divides by gamma: rounding errors grow like ``gamma^-N`` (docs/theory.md), and inverting with
    gamma = 0 is an error. The walk's first step is a plain integrator step (there is no older point yet).
    """

    def __init__(
        self,
        integrator: Integrator | None = None,
        gamma: float | torch.Tensor | GammaFn | Gamma = 1.0,
        backward: Integrator | None = None,
    ):
        self.integrator = DDIM() if integrator is None else integrator
        _check_integrator(self.integrator, "integrator")
        self.backward = self.integrator.first_order if backward is None else backward
        _check_integrator(self.backward, "backward")
        self.gamma = as_gamma(gamma)
        self.nfe = self.integrator.nfe + self.backward.nfe - 1
        symmetric = self.gamma.constant == 1.0 and type(self.backward) is type(self.integrator)
        obelm = getattr(self.gamma, "fn", None) is obelm_gamma
        # The correction gamma (x_prev - Phi_b(x)) carries the backward step's local error: the scheme keeps the
        # lower of the two orders, except the symmetric gamma = 1 scheme and O-BELM, where the leading errors cancel
        if self.gamma.constant == 0.0:
            self.order = self.integrator.order
        elif symmetric or obelm:
            self.order = max(2, self.integrator.order)
        else:
            self.order = min(self.integrator.order, self.backward.order)
        # F's coefficients on (x, x0, eps) per schedule and grid point, for affine integrators
        self._plans = PerSchedule()
        self._affine = self.integrator.affine and self.backward.affine

    nonfinite_persists = True  # x_next includes x through F and x_prev (bdia.sampling.FiniteCheck)

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        return self.integrator.init(model, x, t, t_next, **kw)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        x, t = _pair(state, self).x, state.t
        F = self.drift(model, x, state.t_prev, t, t_next, **kw)
        return State(x, F.forward(state.x_prev), t, t_next)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        if self.gamma.bounds(model.schedule, t_prev, _pair(state, self).t_prev, state.t)[0] == 0:
            raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
        F = self.drift(model, state.x_prev, t_prev, state.t_prev, state.t, **kw)
        return State(F.inverse(state.x), state.x_prev, t_prev, state.t_prev)

    def drift(self, model: Denoiser, x: torch.Tensor, t_prev: float, t: float, t_next: float, **kw: Any) -> Drift:
        """``x_next = gamma x_prev + F(x)``: gamma and F at the shared point ``x`` (one model evaluation at ``t``)."""
        g = self.gamma.constant
        if g is None:
            g = self.gamma.at(model.schedule, t_prev, t, t_next, x)
        pred = model(x, t, **kw)
        if self._affine:
            if pred.m is not None and pred.u is x and type(g) is float:
                # a Model's prediction: F on (x, network output), two numbers memoised per grid point and matrix
                cx, cv = self._folded(model.schedule, t_prev, t, t_next, g, pred.m)
                return Drift(g, *factored2(cx, x, cv, pred.v))
            A, B, C = self._plan(model.schedule, t_prev, t, t_next, g)
            return Drift(g, *pred.factored(A, x, B, C))
        ahead = self.integrator(model, x, t, t_next, pred, **kw)
        back = self.backward(model, x, t, t_prev, pred, **kw)
        return Drift(g, *factored((1.0, ahead), (-g, back)))

    def _plan(self, schedule: Schedule, t_prev: float, t: float, t_next: float, g: float | torch.Tensor):
        """F's coefficients on ``(x, x0, eps)``: the forward map's minus gamma times the backward map's."""
        plans = self._plans(schedule) if isinstance(g, float) else None
        key = (t_prev, t, t_next, g)
        plan = plans.get(key) if plans is not None else None
        if plan is None:
            f = self.integrator.coefficients(schedule, t, t_next)
            b = self.backward.coefficients(schedule, t, t_prev)
            plan = (f[0] - g * b[0], f[1] - g * b[1], f[2] - g * b[2])
            if plans is not None and len(plans) < 1 << 12:  # a few grids' worth
                plans[key] = plan
        return plan

    def _folded(self, schedule: Schedule, t_prev: float, t: float, t_next: float, g: float, m: tuple) -> tuple:
        """``fold`` of the plan by a prediction matrix ``m`` (the same numbers ``Prediction.factored`` computes)."""
        memo = self._plans(schedule)
        key = (t_prev, t, t_next, g, m)
        folded = memo.get(key)
        if folded is None:
            A, B, C = self._plan(schedule, t_prev, t, t_next, g)
            cu, cv = fold(B, C, m)
            folded = (A + cu, cv)
            if len(memo) < 1 << 12:
                memo[key] = folded
        return folded

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """``prod max(1, c_i)`` over the walk's two-step updates: how much a rounding error can grow.

        Sampling: ``c_i = gamma_i alpha(t_prev) / alpha(t_next)``, the parasitic root of the update in the scaled
        coordinate ``x / alpha`` (docs/theory.md; O-BELM's is ``(h_i / h_{i+1})^2``), or ``gamma_i`` where
        ``t_prev`` is pure noise (alpha = 0). Inversion: ``c_i = 1 / gamma_i``, the factor ``unstep`` multiplies
        the newer latent by (``gamma^-N`` for a constant gamma). ``times``: the grid in sampling order.
        """
        memo = self._plans(schedule)
        key = ("amplification", tuple(times), forward)
        value = memo.get(key)
        if value is None:  # (a walk asks once; the same grid is walked again and again)
            value = self._amplification(schedule, times, forward)
            if len(memo) < 1 << 12:
                memo[key] = value
        return value

    def _amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        total = 1.0
        for t_prev, t, t_next in zip(times, times[1:], times[2:], strict=False):
            lo, hi = self.gamma.bounds(schedule, t_prev, t, t_next)
            if forward:
                ap = schedule.at(t_prev).alpha
                c = hi * ap / schedule.at(t_next).alpha if ap > 0 else hi
            elif lo == 0:
                raise ValueError("BDIA with gamma = 0 is the plain integrator and cannot be inverted; use gamma > 0")
            else:
                c = 1.0 / lo
            total *= max(1.0, c)
        return total

    def __repr__(self) -> str:
        return f"BDIA({self.integrator!r}, gamma={self.gamma!r}, backward={self.backward!r})"


def _check_integrator(v: object, name: str) -> None:
    if isinstance(v, type) and issubclass(v, Integrator):
        raise TypeError(f"{name} must be an instance, e.g. {v.__name__}(), got the class {v.__name__}")
    if not isinstance(v, Integrator):
        raise TypeError(f"{name} must be a bdia.solvers.Integrator (DDIM(), Euler(), Heun()), got {type(v).__name__}")


class OBELM(BDIA):
    """O-BELM (Wang et al., NeurIPS 2024, "BELM"): the minimum-local-error bidirectional explicit linear
    multistep sampler, as BDIA over DDIM with the per-step ``gamma_i`` of ``obelm_gamma`` (docs/theory.md).
    Order 2, 1 NFE per step; the first step is a plain DDIM step.

    ``max_root``: ``None`` (the default) is the published formula. A number bounds the parasitic root
    ``a_i = (h_i / h_{i+1})^2`` of each step (``bdia.gamma.BoundedOBELM``): on grids whose steps in ``sbar`` grow
    towards the clean end (the last steps of any grid uniform in a discrete VP schedule's index) the published
    gamma_i reaches 3-5 and extrapolates the network's error. On the shipped digits model ``OBELM(max_root=1.0)`` is
    within 7% of the best of DDIM and BDIA (gamma 0.5, 1) in distance to a fine solution at every N from 10 to 400
    steps, where the published one is the least accurate one-evaluation solver from 50 steps up (10x DDIM's distance
    at 100 steps; docs/benchmarks.md, section 4). It changes only the steps whose root exceeds the bound.

    Its gamma_i can be far below 1 (0.004 on the last step of a 20-step SD grid), so its inversion
    amplifies rounding like ``prod_i 1/gamma_i``: exact in exact arithmetic, fragile in floating point.
    """

    def __init__(self, max_root: float | None = None) -> None:
        super().__init__(DDIM(), gamma=obelm_gamma if max_root is None else BoundedOBELM(max_root))
        self.max_root = max_root
        self.order = 2  # bounded: second order wherever the grid is smooth in sbar (there a_i = 1 + O(h) <= bound)

    def __repr__(self) -> str:
        return "OBELM()" if self.max_root is None else f"OBELM(max_root={self.max_root})"


@dataclasses.dataclass(frozen=True, eq=False)
class EDICTState(State):
    """Coupled copies with the parity of the walk: ``odd`` says whether the next step towards less noise is an odd
    one (counted from the walk's noisy end, as the official EDICT code counts), which ``EDICT(alternate=True)`` needs to
    pick its update order. Each step flips it; a plain coupled ``State`` counts as even."""

    odd: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "odd": self.odd}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> State:
        return EDICTState(d["x_prev"], d["x"], float(d["t_prev"]), float(d["t"]), bool(d["coupled"]), bool(d["odd"]))


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

    ``alternate``: ``False`` (the default) is the paper's equations at every step. ``True`` is what the authors'
    code runs by default (its ``leapfrog_steps``), and so what reproduces published EDICT edits: on odd steps
    (counted from the walk's noisy end) the copies are updated in the other order, ``y' = Phi_{eps(x, t)}(y)`` then
    ``x' = Phi_{eps(y', t)}(x)``, with the same mixing. The walk's parity rides in an ``EDICTState``; inverting data,
    the walk starts at the clean end with even parity, which is the code's when the number of steps inverted is even
    (its 50 steps, or 40 at its editing strength 0.8). After 50 SD steps the two variants' samples are 0.9-1.2% apart
    on the analytic mixtures.

    State: coupled copies at one time, ``EDICTState(x_prev=y, x=x, t_prev=t, t=t, coupled=True, odd=...)``; the
    output latent (the sample of ``bdia.sample``, the inverted noise of ``bdia.invert``) is ``state.x``. ``init`` sets
    ``x = y`` and takes no step.
    """

    nfe, order = 2, 1
    nonfinite_persists = True  # each copy's update includes the copy (bdia.sampling.FiniteCheck)

    def __init__(self, integrator: Integrator | None = None, p: float = 0.93, alternate: bool = False):
        self.integrator = DDIM() if integrator is None else integrator
        _check_integrator(self.integrator, "integrator")
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
        if not isinstance(alternate, bool):
            raise TypeError(f"alternate must be a bool (True: the official code's update order), got {alternate!r}")
        self.p, self.alternate = p, alternate

    def _affine(self, schedule: Schedule, t: float, s: float) -> tuple[float, float]:
        """``(A, B)`` with ``Phi_e(z; t -> s) = A z + B e`` for a noise prediction ``e``: the integrator's
        coefficients with ``x0 = (z - sigma_t e) / alpha_t`` substituted."""
        k = schedule.at(t)
        a, b, c = self.integrator.coefficients(schedule, t, s)
        return a + b / k.alpha, c - b * k.sigma / k.alpha

    def _swapped(self, state: State) -> bool:
        """Whether the step leaving ``state`` towards less noise updates ``y`` first."""
        return self.alternate and getattr(state, "odd", False)

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        """Both copies start as ``x`` (the paper's ``x_T = y_T``); no step is taken."""
        return EDICTState(x, x, t, t, coupled=True) if self.alternate else State(x, x, t, t, coupled=True)

    def _state(self, y: torch.Tensor, x: torch.Tensor, t: float, odd: bool) -> State:
        return EDICTState(y, x, t, t, coupled=True, odd=odd) if self.alternate else State(y, x, t, t, coupled=True)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        y, x, t = state.x_prev, state.x, _coupled(state).t
        p = self.p
        swap = self._swapped(state)
        A, B = self._affine(model.schedule, t, t_next)
        first, second = (y, x) if swap else (x, y)  # the copy updated first, with the other's eps
        first_mid = lincomb((A, first), (B, model(second, t, **kw).eps))
        second_mid = lincomb((A, second), (B, model(first_mid, t, **kw).eps))
        x_mid, y_mid = (second_mid, first_mid) if swap else (first_mid, second_mid)
        x_new = lincomb((p, x_mid), (1.0 - p, y_mid))
        return self._state(lincomb((p, y_mid), (1.0 - p, x_new)), x_new, t_next, not getattr(state, "odd", False))

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        y_new, x_new, s = state.x_prev, state.x, _coupled(state).t
        odd = not getattr(state, "odd", False)  # the parity of the step being undone
        swap = self.alternate and odd
        inv = 1.0 / self.p
        y_mid = lincomb((inv, y_new), (-(1.0 - self.p) * inv, x_new))
        x_mid = lincomb((inv, x_new), (-(1.0 - self.p) * inv, y_mid))
        A, B = self._affine(model.schedule, t_prev, s)
        first_mid, second_mid = (y_mid, x_mid) if swap else (x_mid, y_mid)
        # the step updated `first` with eps(second) and then `second` with eps(first_mid): undo the second update first
        second = lincomb((1.0 / A, second_mid), (-B / A, model(first_mid, t_prev, **kw).eps))
        first = lincomb((1.0 / A, first_mid), (-B / A, model(second, t_prev, **kw).eps))
        x, y = (second, first) if swap else (first, second)
        return self._state(y, x, t_prev, odd)

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """Not bounded here: EDICT's round trips are measured instead (docs/benchmarks.md)."""
        return 1.0

    def __repr__(self) -> str:
        alt = ", alternate=True" if self.alternate else ""
        return f"EDICT({self.integrator!r}, p={self.p}{alt})"


def _coupled(state: State) -> State:
    if not state.coupled:
        raise ValueError(
            f"EDICT continues coupled copies at one time (a state made by EDICT), got a pair of consecutive points at "
            f"times ({state.t_prev}, {state.t}), made by another solver"
        )
    return state
