"""EDICT (Wallace et al. 2023) and O-BELM (Wang et al. 2024): updates pinned to the papers' equations and to the
official EDICT code's loop (written here from its description: on odd steps the copies are updated in the other
order, the mixing is unchanged), round trips against ``bdia.testing``'s rounding model, NFE, O-BELM's bounded
per-step gamma, and clear errors for bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bdia
from bdia import testing
from bdia.gamma import BoundedOBELM
from bdia.models import CountNFE, GaussianMixture
from bdia.report import relative_error as rel_err
from bdia.schedules import EDM, DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, EDICTState, Euler, Heun, obelm_gamma
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
    """50 SD steps both ways, both coupled copies at every point of the walk, to the rounding model
    (``bdia.testing.round_trip``): both ways exact (EDICT starts both copies on the data: no approximation)."""
    N = 50
    model, grid = _mixture(), SD.timesteps(N, "leading", steps_offset=1)
    solver = EDICT(integrator)
    z = _noise(16, 8, dtype)
    out = bdia.sample(model, z, grid, solver)
    assert out.x.dtype == dtype
    back = bdia.invert(model, out, grid, solver)
    assert (back.t_prev, back.t) == (grid[0].item(), grid[0].item())
    data = model.sample(16, torch.Generator().manual_seed(5)).to(dtype)
    testing.assert_round_trip(model, z, grid, solver, data=data)


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
    """Its inverse divides by gamma_i, some far below 1 (prod 1/gamma_i = 1.6e3 here): the rounding model measures
    that growth on the walk."""
    N = 20
    model, grid = CountNFE(_mixture()), SD.timesteps(N, "leading", steps_offset=1)
    z = _noise(8, 8)
    bdia.sample(model, z, grid, OBELM())
    assert model.calls == N
    (r,) = testing.assert_round_trip(model, z, grid, OBELM(), growth=True)
    assert float(r.growth.max()) > 100  # the parasitic root's growth, seen on this walk


# ----------------------------------------------------------------------------------------------- EDICT, official order


def official_edict(model, z: torch.Tensor, ts: list[float], p: float) -> list[torch.Tensor]:
    """The official EDICT code's generative loop (its default ``leapfrog_steps=True``), from its description: a
    pair [x, y]; at step i, for k = 0, 1 the copy ``j = (k + i % 2) % 2`` takes a DDIM step driven by the other
    copy's noise at the step's start; then x <- p x + (1-p) y and y <- (1-p) x + p y with the new x."""
    pair = [z.clone(), z.clone()]
    for i, (t, s) in enumerate(itertools.pairwise(ts)):
        (a_t, b_t), (a_s, b_s) = model.schedule.alpha_sigma(t), model.schedule.alpha_sigma(s)
        for k in range(2):
            j = (k + i % 2) % 2
            e = model(pair[1 - j], t).eps
            pair[j] = (a_s / a_t) * pair[j] + (b_s - a_s * b_t / a_t) * e
        pair[0] = p * pair[0] + (1 - p) * pair[1]
        pair[1] = (1 - p) * pair[0] + p * pair[1]
    return pair


def official_edict_inverse(model, data: torch.Tensor, ts: list[float], p: float) -> list[torch.Tensor]:
    """The official code's deterministic noising (``reverse=True``): over the walk reversed, un-mix, then undo the
    two updates of forward step ``i`` (the one the code calls ``orig_i``) in reverse order."""
    n = len(ts) - 1
    pair = [data.clone(), data.clone()]
    for i in reversed(range(n)):
        t, s = ts[i], ts[i + 1]  # undoing the step t -> s (t noisier)
        (a_t, b_t), (a_s, b_s) = model.schedule.alpha_sigma(t), model.schedule.alpha_sigma(s)
        pair[1] = (pair[1] - (1 - p) * pair[0]) / p
        pair[0] = (pair[0] - (1 - p) * pair[1]) / p
        for k in (1, 0):
            j = (k + i % 2) % 2
            e = model(pair[1 - j], t).eps
            pair[j] = (pair[j] - (b_s - a_s * b_t / a_t) * e) / (a_s / a_t)
    return pair


@pytest.mark.parametrize("n", [7, 10])
def test_edict_alternate_matches_the_official_loop(n):
    model, grid = _mixture(), SD.timesteps(n, "leading", steps_offset=1)
    z = _noise(4, 8)
    out = bdia.sample(model, z, grid, EDICT(alternate=True))
    x, y = official_edict(model, z, grid.tolist(), 0.93)
    assert isinstance(out, EDICTState) and out.odd == (n % 2 == 1)
    torch.testing.assert_close(out.x, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.x_prev, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,strength", [(10, None), (9, None), (50, 0.7), (20, 0.8)])
def test_edict_alternate_inverts_data_as_the_official_code(n, strength):
    """Whatever the number of steps inverted (odd ones too, also through strength, which the official code applies
    by cutting its timesteps before counting them), each step is undone in the order the official code takes it."""
    model, grid = _mixture(), SD.timesteps(n, "leading", steps_offset=1)
    data = model.sample(4, torch.Generator().manual_seed(5))
    inv = bdia.invert(model, data, grid, EDICT(alternate=True), strength=strength)
    walked = grid.tolist() if strength is None else grid.tolist()[n - int(n * strength) :]
    x, y = official_edict_inverse(model, data, walked, 0.93)
    torch.testing.assert_close(inv.x, x, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(inv.x_prev, y, rtol=1e-11, atol=1e-11)
    back = bdia.sample(model, inv, grid, EDICT(alternate=True), strength=strength)
    assert rel_err(back.x, data) < 1e-12


@pytest.mark.parametrize("n", [9, 20])
def test_edict_alternate_round_trips_exactly_and_differs_from_the_paper_order(n):
    model, grid = _mixture(), SD.timesteps(n, "leading", steps_offset=1)
    z = _noise(8, 8)
    solver = EDICT(alternate=True)
    out = bdia.sample(model, z, grid, solver)
    testing.assert_round_trip(model, z, grid, solver, data=model.sample(8, torch.Generator().manual_seed(6)))
    assert rel_err(out.x, bdia.sample(model, z, grid, EDICT()).x) > 1e-4


def test_edict_state_saves_its_parity(tmp_path):
    s = EDICTState(_noise(2, 3), _noise(2, 3, seed=1), 5.0, 5.0, coupled=True, odd=True)
    back = State.from_state_dict(s.state_dict())
    assert isinstance(back, EDICTState) and back.odd is True and torch.equal(back.x, s.x)
    bdia.state.save(s, tmp_path / "s.pt")
    assert bdia.state.load(tmp_path / "s.pt").odd is True
    assert s[0].odd is True and s.to(torch.float32).odd is True


def test_edict_alternate_rejects_a_non_bool():
    with pytest.raises(TypeError, match="alternate must be a bool"):
        EDICT(alternate=1)  # type: ignore[arg-type]
    assert repr(EDICT(alternate=True)) == "EDICT(DDIM(), p=0.93, alternate=True)"


# ----------------------------------------------------------------------------------------------- O-BELM, bounded


def test_bounded_obelm_caps_only_steps_whose_root_exceeds_the_bound():
    ts = SD.timesteps(100, "trailing", set_alpha_to_one=True).tolist()
    b = BoundedOBELM(1.0)
    changed = 0
    for tp, t, tn in zip(ts, ts[1:], ts[2:], strict=False):
        g, gb = obelm_gamma(SD, tp, t, tn), b(SD, tp, t, tn)
        root = g * SD.at(tp).alpha / SD.at(tn).alpha
        if root <= 1.0:
            assert gb == g
        else:
            changed += 1
            assert math.isclose(gb * SD.at(tp).alpha / SD.at(tn).alpha, 1.0, rel_tol=1e-14)
    # the published gamma reaches 5 on the last step of this grid, and the bound changes a minority of steps
    assert obelm_gamma(SD, ts[-3], ts[-2], ts[-1]) > 4 and 0 < changed < len(ts) // 2


def test_obelm_max_root_is_an_option_and_the_default_is_published():
    model, grid = _mixture(), SD.timesteps(30, "trailing", set_alpha_to_one=True)
    z = _noise(4, 8)
    assert OBELM().gamma.fn is obelm_gamma and repr(OBELM()) == "OBELM()"
    bounded = OBELM(max_root=1.0)
    assert repr(bounded) == "OBELM(max_root=1.0)" and bounded.order == 2 and bounded.nfe == 1
    # sampling: the bounded roots leave rounding near its plain growth; the published ones amplify it
    assert bounded.amplification(SD, grid.tolist(), True) < 1.5 < 5 < OBELM().amplification(SD, grid.tolist(), True)
    a, b = bdia.sample(model, z, grid, OBELM()).x, bdia.sample(model, z, grid, bounded).x
    assert rel_err(a, b) > 1e-6  # the last steps differ
    testing.assert_round_trip(model, z, grid, bounded)


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("1", TypeError)])
def test_bounded_obelm_rejects_bad_bounds(bad, err):
    with pytest.raises(err, match="max_root"):
        OBELM(max_root=bad)
