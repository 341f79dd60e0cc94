"""A high-accuracy reference solution of the probability-flow ODE, for measuring solvers' true errors.

Integrates ``dx/dt = alpha'(t) x0_hat(x, t) + sigma'(t) eps_hat(x, t)`` in the schedule's native time with
scipy's ``solve_ivp`` (DOP853: Dormand & Prince's explicit Runge-Kutta method of order 8 with adaptive steps)
at tight tolerances, in float64. Not a sampler (hundreds of model evaluations per grid step): it is the
oracle against which the tests and benchmarks measure each integrator's error and empirical order.
scipy is imported inside ``solve`` only (it is a test/benchmark dependency, not a runtime one).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from bdia.models import Denoiser
from bdia.schedules import DiscreteVP, check_grid

__all__ = ["solve"]


def solve(
    model: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-12,
    breakpoints: Sequence[float] | None = None,
    trajectory: bool = False,
    **model_kwargs: Any,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``x`` at ``ts[0]`` through every time of the grid ``ts``.

    ``model`` is any denoiser; it is called on float64 states (``model(x, t, **model_kwargs)``), so it must
    accept them. The right-hand side is ``alpha'(t) x0_hat + sigma'(t) eps_hat``, the time derivative of
    ``x = alpha x0 + sigma eps`` along the flow: the ODE that DDIM, Euler and Heun discretise (native time is
    well conditioned wherever the schedule's derivatives are finite, which is checked at the grid times).

    The solve restarts at every grid time (so each grid value is an end point, not an interpolant) and at
    every ``breakpoint`` inside the span: times where the right-hand side is not smooth, which an adaptive
    solver would otherwise creep through with many rejected steps. Default: none, except for a
    ``DiscreteVP`` schedule, whose interpolation is C1 piecewise cubic with knots at the integer times
    (without the restarts the solution is off by ~1e-9 instead of ~1e-15; with them a whole 1000-step
    table costs ~40 evaluations per knot, ~4e4 in all: use ``breakpoints=[]`` for a faster, rougher answer).

    ``rtol``, ``atol``: DOP853's local tolerances (per element); the global error is usually within a small
    multiple of them. Returns the float64 solution at ``ts[-1]`` on ``x``'s device, or with
    ``trajectory=True`` the solutions at every grid time stacked, shape ``(len(ts), *x.shape)``, the first
    being ``x`` itself.
    """
    from scipy.integrate import solve_ivp  # a test/benchmark dependency: imported only when used

    times = check_grid(ts, model.schedule)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    schedule = model.schedule
    for t in times:
        k = schedule.at(t)
        if not all(math.isfinite(v) for v in k):
            raise ValueError(
                f"ts contains t={t}, where {type(schedule).__name__}'s coefficients {tuple(k)} are not all finite: "
                "the ODE in native time is singular there; end the grid just before it"
            )
    if breakpoints is None:
        breakpoints = _integer_knots(times) if isinstance(schedule, DiscreteVP) else []
    breaks = sorted({float(b) for b in breakpoints if times[-1] < b < times[0]} - set(times), reverse=True)

    shape, device = x.shape, x.device

    @torch.no_grad()
    def rhs(t: float, y):
        xt = torch.from_numpy(y).reshape(shape).to(device)
        p, k = model(xt, t, **model_kwargs), schedule.at(t)
        return (k.dalpha * p.x0.to(torch.float64) + k.dsigma * p.eps.to(torch.float64)).reshape(-1).cpu().numpy()

    # the segments between consecutive stops (grid times and breakpoints), noisiest first
    stops = sorted(set(times) | set(breaks), reverse=True)
    keep = set(times)
    y = x.detach().to(torch.float64).reshape(-1).cpu().numpy().copy()
    out = [y.copy()]
    for a, b in itertools.pairwise(stops):
        sol = solve_ivp(rhs, (a, b), y, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"the reference ODE solve failed between t={a} and t={b}: {sol.message}")
        y = sol.y[:, -1].copy()
        if b in keep:
            out.append(y.copy())
    values = torch.from_numpy(np.stack(out)).to(device).reshape(len(times), *shape)
    return values if trajectory else values[-1]


def _integer_knots(times: list[float]) -> list[float]:
    return [float(j) for j in range(math.ceil(times[-1]), math.floor(times[0]) + 1)]
