"""A solver's empirical order of accuracy, measured against a tight solution of an exactly known ODE.

Problem: the exact denoiser of a 32-d Gaussian mixture (3 components) under the continuous ``VP()`` schedule, on
grids uniform in ``t`` from 1 to 0.02 (``VP().timesteps(n, eps=0.02)``), N = 20, 40, 80, 160 steps; the error
is the largest distance at the end point over 8 samples, and the order is the least-squares slope of
``log(error)`` against ``log(1/N)``. ``VP()`` is analytic in ``t`` and, ending at ``t = 0.02`` (sigma = 0.077),
every grid used is smooth in the scaled time ``sigma/alpha`` in which DDIM and BDIA live, so each method shows its
nominal order (a grid ending at ``t = 1e-3`` is not: BDIA's second order there needs equal steps in
``sigma/alpha``, and it measures 1.6).

Reference: ``bdia.reference.solve`` (scipy's DOP853 at rtol = atol = 1e-12) where scipy is installed, else a walk
of 2000 steps of the classical fourth-order Runge-Kutta method (``RK4``; error below 1e-12 here).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import torch

import bdia
from bdia.integrators import Integrator, predict
from bdia.models import Denoiser, GaussianMixture, Prediction
from bdia.schedules import VP, Schedule

__all__ = ["RK4", "Order", "OrderProblem", "fitted_order", "measured_order", "reference"]


class RK4(Integrator):
    """The classical fourth-order Runge-Kutta method on ``dx/dt = alpha'(t) x0 + sigma'(t) eps`` in the schedule's
    native time. Order 4, 4 NFE. A reference integrator (steps must not end at a singular time, e.g. VP's t = 0)."""

    order, nfe = 4, 4

    def __call__(
        self, model: Denoiser, x: torch.Tensor, t: float, s: float, pred: Prediction | None = None, **kw: Any
    ) -> torch.Tensor:
        sch, h = model.schedule, s - t

        def f(z: torch.Tensor, tau: float, p: Prediction | None = None) -> torch.Tensor:
            k, p = sch.at(tau), p if p is not None else model(z, tau, **kw)
            return k.dalpha * p.x0 + k.dsigma * p.eps

        k1 = f(x, t, pred if pred is not None else predict(model, x, t, s, **kw))
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = f(x + h * k3, s)
        return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    @property
    def first_order(self) -> Integrator:
        from bdia.integrators import Euler

        return Euler()


@dataclasses.dataclass(frozen=True)
class OrderProblem:
    """Where an order is measured: a schedule and a mixture, latents, the end time and the step counts."""

    dim: int = 32
    components: int = 3
    std: float = 0.3
    seed: int = 1
    batch: int = 8
    end: float = 0.02
    steps: tuple[int, ...] = (20, 40, 80, 160)

    def schedule(self) -> Schedule:
        return _vp()

    def model(self) -> GaussianMixture:
        return GaussianMixture.random(
            self.schedule(), dim=self.dim, components=self.components, std=self.std, seed=self.seed
        )

    def start(self) -> torch.Tensor:
        return torch.randn(self.batch, self.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grid(self, n: int) -> torch.Tensor:
        return self.schedule().timesteps(n, eps=self.end)


_VP: list[VP] = []


def _vp() -> VP:
    if not _VP:
        _VP.append(VP())
    return _VP[0]


_REFERENCES: dict[tuple[OrderProblem, str], torch.Tensor] = {}


def reference(problem: OrderProblem = OrderProblem(), method: str | None = None) -> torch.Tensor:
    """The problem's ODE solution at its end time, float64, computed once per problem: ``method`` ``"scipy"``
    (DOP853, needs scipy), ``"rk4"`` (2000 steps of ``RK4``), or ``None`` (scipy where installed)."""
    if method is None:
        method = "scipy" if importlib.util.find_spec("scipy") is not None else "rk4"
    if method not in ("scipy", "rk4"):
        raise ValueError(f"method must be 'scipy', 'rk4' or None, got {method!r}")
    key = (problem, method)
    if key not in _REFERENCES:
        model, x = problem.model(), problem.start()
        if method == "scipy":
            from bdia.reference import solve

            _REFERENCES[key] = solve(model, x, problem.grid(problem.steps[0]))
        else:
            _REFERENCES[key] = bdia.sample(model, x, problem.grid(2000), RK4()).x
    return _REFERENCES[key]


@dataclasses.dataclass(frozen=True)
class Order:
    """A measured order: the errors at each step count, and what they say about a declared order.

    ``slope``: the least-squares slope of ``log(error)`` against ``log(1/N)`` over the last three step counts.
    ``agrees(p)``: whether the errors follow ``a h^p + b h^(p+1)`` (``h = 1/N``) over the last four counts, the
    leading two terms of a method of order ``p``: a fit whose largest relative residual is at most 5%, and whose
    order-``p`` term is not negligible (at least 10% of the fitted error at the finest grid; else the method
    converges faster than it declares). A method whose first-order term is small (BDIA with gamma near 1, whose
    correction weighs (1 - gamma)) has a slope well above 1 at 160 steps and is still of order 1; the two-term fit
    says so where a bracket on the slope cannot.
    """

    slope: float
    steps: tuple[int, ...]
    errors: tuple[float, ...]

    def local_slopes(self) -> list[float]:
        e = self.errors
        return [math.log2(e[i] / e[i + 1]) if e[i + 1] > 0 else math.inf for i in range(len(e) - 1)]

    def fit(self, p: int) -> tuple[float, float]:
        """``(largest relative residual, share of the order-p term at the finest grid)`` of the two-term fit."""
        pts = [(1.0 / n, e) for n, e in zip(self.steps, self.errors, strict=True) if 0 < e < math.inf][-4:]
        if len(pts) < 3:
            return math.inf, 0.0
        # weighted least squares on (a, b): minimise sum ((a h^p + b h^(p+1)) / e - 1)^2 (2x2 normal equations)
        rows = [(h**p / e, h ** (p + 1) / e) for h, e in pts]
        s11 = sum(u * u for u, _ in rows)
        s12 = sum(u * v for u, v in rows)
        s22 = sum(v * v for _, v in rows)
        t1, t2 = sum(u for u, _ in rows), sum(v for _, v in rows)
        det = s11 * s22 - s12 * s12
        if det == 0:
            return math.inf, 0.0
        a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
        residual = max(abs(a * u + b * v - 1.0) for u, v in rows)
        h = pts[-1][0]
        lead, rest = abs(a * h**p), abs(b * h ** (p + 1))
        return residual, lead / (lead + rest) if lead + rest > 0 else 0.0

    def agrees(self, p: int) -> tuple[bool, str]:
        """Whether the errors are those of a method of order ``p``, and why not."""
        residual, share = self.fit(p)
        if residual > 0.05:
            return False, (
                f"its errors do not follow a h^{p} + b h^{p + 1} (largest relative misfit {residual:.0%}; slopes "
                f"between step counts {', '.join(f'{v:.2f}' for v in self.local_slopes())})"
            )
        if share < 0.1:
            return False, (
                f"its order-{p} error term is negligible ({share:.1%} of the error at N = {self.steps[-1]}): it "
                f"converges faster than order {p} (slopes {', '.join(f'{v:.2f}' for v in self.local_slopes())})"
            )
        return True, ""

    def __str__(self) -> str:
        pairs = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(self.steps, self.errors, strict=True))
        return f"measured order {self.slope:.2f} ({pairs})"


def fitted_order(steps: tuple[int, ...] | list[int], errors: tuple[float, ...] | list[float]) -> float:
    """Least-squares slope of ``log(error)`` against ``log(1/N)``."""
    lx = [-math.log(n) for n in steps]
    ly = [math.log(e) for e in errors]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def measured_order(solver: Any, problem: OrderProblem = OrderProblem(), max_steps: int = 2560) -> Order:
    """Sample the problem with ``solver`` at each step count and measure the order of its error at the end point.

    Step counts are doubled (up to ``max_steps``) until each of the last three slopes between consecutive counts is
    within 0.25 of the next, so that the last four are past the pre-asymptotic regime (EDICT's coupled copies only
    settle past 160 steps on this problem). Step counts whose error is within 1e3 times the reference's own accuracy
    (1e-12) are left out (a fourth-order method reaches it)."""
    model, x, ref = problem.model(), problem.start(), reference(problem)
    steps: list[int] = []
    errors: list[float] = []

    def settled() -> bool:
        if len(errors) < 4 or not all(math.isfinite(e) and e > 0 for e in errors[-4:]):
            return False
        a, b, c = (math.log2(errors[i] / errors[i + 1]) for i in (-4, -3, -2))
        return abs(a - b) <= 0.25 and abs(b - c) <= 0.25

    for n in problem.steps:
        steps.append(n)
        errors.append(_error(model, x, ref, problem.grid(n), solver))
    while not settled() and steps[-1] * 2 <= max_steps and errors[-1] > 1e-9:
        steps.append(steps[-1] * 2)
        errors.append(_error(model, x, ref, problem.grid(steps[-1]), solver))
    usable = [(n, e) for n, e in zip(steps, errors, strict=True) if e > 1e-9] or list(zip(steps, errors, strict=True))
    tail = usable[-3:] if len(usable) >= 3 else usable[-2:]
    if len(tail) < 2 or any(not (math.isfinite(e) and e > 0) for _, e in tail):
        return Order(math.nan, tuple(n for n, _ in usable), tuple(e for _, e in usable))
    slope = fitted_order([n for n, _ in tail], [e for _, e in tail])
    return Order(slope, tuple(n for n, _ in usable), tuple(e for _, e in usable))


def _error(model: Denoiser, x: torch.Tensor, ref: torch.Tensor, ts: torch.Tensor, solver: Any) -> float:
    out = bdia.sample(model, x, ts, solver).x
    e = float((out.double() - ref).norm(dim=-1).max())
    return e if math.isfinite(e) else math.inf
