"""EDICT (Wallace et al. 2023) and O-BELM (Wang et al. 2024): updates pinned to the papers' equations, exact
round trips with tolerances that scale with the dtype's eps and N, NFE, and clear errors for bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bdia
from bdia.models import CountNFE, GaussianMixture
from bdia.report import relative_error as rel_err
from bdia.schedules import EDM, DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, Euler, Heun, obelm_gamma
from bdia.state import State

SD = DiscreteVP.stable_diffusion()


def _mixture(schedule=SD, dim: int = 8) -> GaussianMixture:
    return GaussianMixture.random(schedule, dim=dim, components=4, std=0.3, seed=1)


def _noise(n: int, dim: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------- EDICT


def _edict_paper_step(model, x, y, t, s, p):
    """Wallace et al., eqs. 10-13, written with a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t)."""
    a_t, b_t = model.schedule.alpha_sigma(t)
    a_s, b_s = model.schedule.alpha_sigma(s)
    c_x, c_e = a_s / a_t, b_s - a_s * b_t / a_t
    x_inter = c_x * x + c_e * model(y, t).eps
    y_inter = c_x * y + c_e * model(x_inter, t).eps
    x_new = p * x_inter + (1 - p) * y_inter
    y_new = p * y_inter + (1 - p) * x_new
    return x_new, y_new


def test_edict_step_matches_the_papers_equations():
    model, ts = _mixture(), SD.timesteps(10, "leading", steps_offset=1).tolist()
    x, y = _noise(4, 8, seed=1), _noise(4, 8, seed=2)
    solver = EDICT(p=0.9)
    out = solver.step(model, State(y, x, ts[2], ts[2], coupled=True), ts[3])
    x_ref, y_ref = _edict_paper_step(model, x, y, ts[2], ts[3], 0.9)
    assert (out.t_prev, out.t) == (ts[3], ts[3])
    torch.testing.assert_close(out.x, x_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.x_prev, y_ref, rtol=1e-13, atol=1e-13)


def test_edict_whole_trajectory_matches_the_paper_and_outputs_x():
    model, grid = _mixture(), SD.timesteps(20, "leading", steps_offset=1)
    z = _noise(4, 8)
    out = bdia.sample(model, z, grid, EDICT())
    x, y, ts = z, z, grid.tolist()
    for t, s in itertools.pairwise(ts):
        x, y = _edict_paper_step(model, x, y, t, s, 0.93)
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_prev, y, rtol=1e-12, atol=1e-12)


def test_edict_over_euler_is_euler_with_the_other_copys_eps():
    """The generalisation: the integrator's step on one copy, its prediction's eps taken from the other."""
    model, ts = _mixture(), SD.timesteps(10, "leading", steps_offset=1).tolist()
    x, y = _noise(3, 8, seed=3), _noise(3, 8, seed=4)
    t, s, p = ts[1], ts[2], 0.8

    def euler(z, e):
        a, sig = model.schedule.alpha_sigma(t)
        return Euler()(model, z, t, s, bdia.Prediction((z - sig * e) / a, e))

    x_inter = euler(x, model(y, t).eps)
    y_inter = euler(y, model(x_inter, t).eps)
    x_new = p * x_inter + (1 - p) * y_inter
    out = EDICT(Euler(), p=p).step(model, State(y, x, t, t, coupled=True), s)
    torch.testing.assert_close(out.x, x_new, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(out.x_prev, p * y_inter + (1 - p) * x_new, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("integrator", [DDIM(), Euler()], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_edict_round_trips_are_exact_to_rounding(integrator, dtype):
    """50 SD steps both ways. Each step and its inverse make O(10) roundings, amplified at most by the
    1/p and alpha_t/alpha_s factors of the inverse (about 1.1 each): 10 N eps bounds the relative error
    (measured: about 0.2 N eps in float64, 0.7 N eps in float32)."""
    N = 50
    model, grid = _mixture(), SD.timesteps(N, "leading", steps_offset=1)
    solver = EDICT(integrator)
    tol = 10 * N * torch.finfo(dtype).eps
    z = _noise(16, 8, dtype)
    out = bdia.sample(model, z, grid, solver)
    assert out.x.dtype == dtype
    back = bdia.invert(model, out, grid, solver)
    assert (back.t_prev, back.t) == (grid[0].item(), grid[0].item())
    assert rel_err(back.x, z) < tol and rel_err(back.x_prev, z) < tol
    # data -> invert -> sample: exact as well (EDICT starts both copies on the data: no approximation)
    data = model.sample(16, torch.Generator().manual_seed(5)).to(dtype)
    inv = bdia.invert(model, data, grid, solver)
    assert rel_err(bdia.sample(model, inv, grid, solver).x, data) < tol


def test_edict_costs_two_evaluations_per_step_both_ways():
    N = 7
    model, grid = CountNFE(_mixture()), SD.timesteps(N, "leading", steps_offset=1)
    out = bdia.sample(model, _noise(2, 8), grid, EDICT())
    assert model.calls == 2 * N == EDICT.nfe * N
    model.calls = 0
    bdia.invert(model, out, grid, EDICT())
    assert model.calls == 2 * N


def test_edict_keeps_inputs_and_passes_model_kwargs():
    model, grid = _mixture(), SD.timesteps(5, "leading", steps_offset=1)
    z = _noise(4, 8)
    z0 = z.clone()
    labels = torch.tensor([0, 1, 2, 3])
    cond = bdia.sample(model, z, grid, EDICT(), labels=labels)
    assert torch.equal(z, z0)
    uncond = bdia.sample(model, z, grid, EDICT())
    assert not torch.allclose(cond.x, uncond.x)
    back = bdia.invert(model, cond, grid, EDICT(), labels=labels)
    assert rel_err(back.x, z) < 1e-12


def test_edict_init_takes_no_step():
    z = _noise(2, 8)
    s = EDICT().init(_mixture(), z, 981.0, 961.0)
    assert s.x is z and s.x_prev is z and (s.t_prev, s.t) == (981.0, 981.0)


@pytest.mark.parametrize("p", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_edict_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match=r"p must lie in \(0, 1\]"):
        EDICT(p=p)


@pytest.mark.parametrize("p", ["0.93", True, torch.tensor(0.9), None])
def test_edict_rejects_p_of_the_wrong_type(p):
    with pytest.raises(TypeError, match="p must be a float"):
        EDICT(p=p)


def test_edict_rejects_a_gamma_given_as_integrator_and_multistage_integrators():
    with pytest.raises(TypeError, match=r"integrator must be a bdia\.solvers\.Integrator"):
        EDICT(0.93)  # type: ignore[arg-type]  # e.g. p passed positionally
    with pytest.raises(ValueError, match="single-evaluation integrator"):
        EDICT(Heun())


def test_edict_refuses_a_state_of_consecutive_points():
    """A BDIA state holds two times; continuing it with EDICT would silently mix two different schemes."""
    model, grid = _mixture(), SD.timesteps(10, "leading", steps_offset=1)
    bdia_state = bdia.sample(model, _noise(2, 8), grid[:4], BDIA())
    with pytest.raises(ValueError, match="coupled copies at one time"):
        EDICT().step(model, bdia_state, grid[4].item())
    with pytest.raises(ValueError, match="coupled copies at one time"):
        EDICT().unstep(model, bdia_state, grid[2].item())


# ----------------------------------------------------------------------------------------------- O-BELM


def _obelm_paper_update(schedule, x_ip1, x_i, eps, t_ip1, t_i, t_im1):
    """Wang et al. (2024), O-BELM, with xbar = x / alpha and h_i = sbar_i - sbar_{i-1}:
    ``xbar_{i-1} = h_i^2/h_{i+1}^2 xbar_{i+1} + (h_{i+1}^2 - h_i^2)/h_{i+1}^2 xbar_i
    - h_i (h_i + h_{i+1})/h_{i+1} eps(x_i, t_i)``, in the paper's index: x_{i+1} at t_ip1 is the noisier point."""
    (a1, s1), (a0, s0), (am, sm) = (schedule.alpha_sigma(t) for t in (t_ip1, t_i, t_im1))
    h_i, h_ip1 = s0 / a0 - sm / am, s1 / a1 - s0 / a0
    xbar = (h_i**2 / h_ip1**2) * x_ip1 / a1 + (h_ip1**2 - h_i**2) / h_ip1**2 * x_i / a0
    xbar = xbar - h_i * (h_i + h_ip1) / h_ip1 * eps
    return am * xbar


@pytest.mark.parametrize(
    "schedule,grid", [(SD, SD.timesteps(25, "leading", steps_offset=1)), (EDM(), EDM().timesteps(12))]
)
def test_obelm_one_step_equals_the_published_update(schedule, grid):
    model, ts = _mixture(schedule), grid.tolist()
    a, b = _noise(3, 8, seed=6) * 2, _noise(3, 8, seed=7) * 2
    for i in (1, len(ts) // 2, len(ts) - 2):
        out = OBELM().step(model, State(a, b, ts[i - 1], ts[i]), ts[i + 1])
        ref = _obelm_paper_update(schedule, a, b, model(b, ts[i]).eps, ts[i - 1], ts[i], ts[i + 1])
        torch.testing.assert_close(out.x, ref, rtol=1e-12, atol=1e-12)


def test_obelm_trajectory_equals_the_published_recursion():
    """First step DDIM (the paper's start), then the O-BELM recursion, over 30 SD steps."""
    model, grid = _mixture(), SD.timesteps(30, "leading", steps_offset=1)
    ts = grid.tolist()
    z = _noise(8, 8)
    prev, cur = z, DDIM()(model, z, ts[0], ts[1])
    for i in range(1, len(ts) - 1):
        prev, cur = cur, _obelm_paper_update(SD, prev, cur, model(cur, ts[i]).eps, ts[i - 1], ts[i], ts[i + 1])
    out = bdia.sample(model, z, grid, OBELM())
    assert rel_err(out.x, cur) < 1e-12 and rel_err(out.x_prev, prev) < 1e-12
    # and it is BDIA-DDIM with obelm_gamma
    torch.testing.assert_close(bdia.sample(model, z, grid, BDIA(DDIM(), obelm_gamma)).x, out.x, rtol=0, atol=0)


def test_obelm_inverts_exactly_in_float64_and_costs_one_evaluation_per_step():
    """Its inverse divides by gamma_i, some far below 1: the bound scales with prod(max(1, 1/gamma_i))."""
    N = 20
    model, grid = CountNFE(_mixture()), SD.timesteps(N, "leading", steps_offset=1)
    ts = grid.tolist()
    growth = math.prod(max(1.0, 1.0 / obelm_gamma(SD, ts[i - 1], ts[i], ts[i + 1])) for i in range(1, N))
    z = _noise(8, 8)
    out = bdia.sample(model, z, grid, OBELM())
    assert model.calls == N
    back = bdia.invert(model, out, grid, OBELM())
    assert rel_err(back.x, z) < 10 * N * torch.finfo(torch.float64).eps * growth
