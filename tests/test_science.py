"""The baselines as editing pipelines run them and the scaled-time second-order integrators.

- ``DDIMInverse`` against diffusers' ``DDIMInverseScheduler`` step by step, driven by the network evaluated at each
  step's destination (as diffusers' inversion pipelines and null-text inversion call it);
- ``EDICT(alternate=True)`` against a transcription of the official EDICT code's loop (written here from its
  description: on odd steps the copies are updated in the other order, the mixing is unchanged);
- ``ScaledHeun`` and ``DPMSolver2`` against the papers' formulas (DPM-Solver-2 with VP's closed-form inverse of
  lambda from Lu et al. 2022, independent of the library's bisection), exactness for a constant eps, NFE;
- ``OBELM(max_root=...)``: the bounded per-step gamma, with the published one untouched.
Orders on the analytic mixture are in tests/test_accuracy.py.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bdia
from bdia.gamma import BoundedOBELM, obelm_gamma
from bdia.models import CountNFE, GaussianMixture, Prediction
from bdia.report import relative_error
from bdia.schedules import EDM, VP, DiscreteVP
from bdia.solvers import (
    BDIA,
    DDIM,
    EDICT,
    OBELM,
    DDIMInverse,
    DPMSolver2,
    EDICTState,
    Heun,
    ScaledHeun,
)
from bdia.state import State
from tests.test_oracles import DDIM_CASES, _ddim_setup, _step_bound

SD = DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


def _mixture(schedule=SD, dim: int = 8, seed: int = 1) -> GaussianMixture:
    return GaussianMixture.random(schedule, dim=dim, components=4, std=0.3, seed=seed)


def _noise(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- DDIMInverse


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


@pytest.mark.parametrize("pred,spacing,offset,to_one,n", [c for c in DDIM_CASES if c[0] == "epsilon"])
def test_ddim_inverse_matches_diffusers_inverse_scheduler_step_by_step(diffusers, pred, spacing, offset, to_one, n):
    """diffusers' pipelines call ``DDIMInverseScheduler.step(unet(x, t), t, x)``: the output at the destination ``t``
    moves ``x`` from ``t - T // n`` to ``t``. ``invert`` with ``DDIMInverse()`` must make the same step."""
    sched, schedule, ts, net, model = _ddim_setup(
        diffusers, diffusers.DDIMInverseScheduler, pred, spacing, offset, to_one, n
    )
    up = ts.flip(0).tolist()
    assert [float(t) for t in sched.timesteps.tolist()] == up[1:]
    x_0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    path = [x_0]
    counted = CountNFE(model)
    bdia.invert(counted, x_0, ts, DDIMInverse(), callback=lambda st: path.append(st.state.x))
    assert len(path) == n + 1 and counted.calls == n
    for i, t in enumerate(sched.timesteps.tolist()):
        x = path[i]
        model_output = net(x, torch.full((4,), float(t)))  # the network at the DESTINATION, as the pipelines call it
        theirs = sched.step(model_output, t, x).prev_sample
        bound = _step_bound(schedule, pred, up[i], float(t), x, model_output)
        err = (theirs - path[i + 1]).abs()
        assert bool((err <= bound).all()), f"step {i} (to t={t}): err/bound {float((err / bound).max()):.3g}"


def test_ddim_inverse_differs_from_ddim_inversion_only_when_inverting():
    model, grid = _mixture(), SD.timesteps(20, "leading", steps_offset=1)
    z = _noise(6, 8)
    assert torch.equal(bdia.sample(model, z, grid, DDIMInverse()).x, bdia.sample(model, z, grid, DDIM()).x)
    data = model.sample(6, torch.Generator().manual_seed(3))
    a, b = bdia.invert(model, data, grid, DDIMInverse()).x, bdia.invert(model, data, grid, DDIM()).x
    assert relative_error(a, b) > 1e-3
    assert isinstance(DDIMInverse().first_order, DDIM) and type(DDIMInverse().first_order) is DDIM
    assert repr(DDIMInverse()) == "DDIMInverse()"


def test_ddim_inverse_round_trips_closer_than_ddim_inversion_on_the_mixture():
    """noise -> sample (DDIM) -> invert on a 64-d mixture, 50 leading SD steps: evaluating at the destination is the
    more accurate inversion (measured: 0.097 against 0.15, docs/benchmarks.md)."""
    model = GaussianMixture.random(SD, dim=64, components=8, std=0.3, seed=3)
    grid = SD.timesteps(50, "leading", steps_offset=1)
    z = _noise(32, 64, seed=4)
    x = bdia.sample(model, z, grid, DDIM()).x
    err_dest = relative_error(bdia.invert(model, x, grid, DDIMInverse()).x, z)
    err_start = relative_error(bdia.invert(model, x, grid, DDIM()).x, z)
    assert err_dest < 0.8 * err_start, (err_dest, err_start)


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
    assert relative_error(back.x, data) < 1e-12


@pytest.mark.parametrize("n", [9, 20])
def test_edict_alternate_round_trips_exactly_and_differs_from_the_paper_order(n):
    model, grid = _mixture(), SD.timesteps(n, "leading", steps_offset=1)
    z = _noise(8, 8)
    solver = EDICT(alternate=True)
    out = bdia.sample(model, z, grid, solver)
    back = bdia.invert(model, out, grid, solver)
    assert relative_error(back.x, z) < 10 * n * 2.2e-16 and relative_error(back.x_prev, z) < 10 * n * 2.2e-16
    data = model.sample(8, torch.Generator().manual_seed(6))
    assert (
        relative_error(bdia.sample(model, bdia.invert(model, data, grid, solver), grid, solver).x, data)
        < 10 * n * 2.2e-16
    )
    assert relative_error(out.x, bdia.sample(model, z, grid, EDICT()).x) > 1e-4


def test_edict_state_saves_its_parity(tmp_path):
    s = EDICTState(_noise(2, 3), _noise(2, 3, 1), 5.0, 5.0, coupled=True, odd=True)
    back = State.from_state_dict(s.state_dict())
    assert isinstance(back, EDICTState) and back.odd is True and torch.equal(back.x, s.x)
    bdia.state.save(s, tmp_path / "s.pt")
    assert bdia.state.load(tmp_path / "s.pt").odd is True
    assert s[0].odd is True and s.to(torch.float32).odd is True


def test_edict_alternate_rejects_a_non_bool():
    with pytest.raises(TypeError, match="alternate must be a bool"):
        EDICT(alternate=1)  # type: ignore[arg-type]
    assert repr(EDICT(alternate=True)) == "EDICT(DDIM(), p=0.93, alternate=True)"


# ----------------------------------------------------------------------------------------------- scaled-time 2nd order


class ConstantEps:
    """A denoiser whose noise prediction is one fixed tensor: the scaled ODE ``d xbar/d sbar = c`` is then solved
    exactly by ``xbar_s = xbar_t + (sbar_s - sbar_t) c``."""

    def __init__(self, schedule, c: torch.Tensor):
        self.schedule, self.c = schedule, c

    def __call__(self, x, t, **kw):
        a, s = self.schedule.alpha_sigma(t)
        return Prediction((x - s * self.c) / a, self.c.expand_as(x).clone())


@pytest.mark.parametrize("integrator", [ScaledHeun(), DPMSolver2(), DDIM()], ids=repr)
@pytest.mark.parametrize("schedule,grid", [(SD, SD.timesteps(7, "trailing")), (VP(), VP().timesteps(6))])
def test_exact_when_eps_is_constant(integrator, schedule, grid):
    c = _noise(3, 5, seed=8)
    model = ConstantEps(schedule, c)
    x = _noise(3, 5, seed=9)
    ts = grid.tolist()
    out = bdia.sample(model, x, grid, integrator).x
    (a0, s0), (a1, s1) = schedule.alpha_sigma(ts[0]), schedule.alpha_sigma(ts[-1])
    exact = a1 * (x / a0 + (s1 / a1 - s0 / a0) * c)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12)


def test_scaled_heun_step_is_the_trapezoid_in_scaled_time():
    model, ts = _mixture(), SD.timesteps(10, "trailing").tolist()
    x = _noise(4, 8, seed=10)
    t, s = ts[3], ts[4]
    (a_t, s_t), (a_s, s_s) = SD.alpha_sigma(t), SD.alpha_sigma(s)
    e_t = model(x, t).eps
    pred_x = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * e_t)  # Euler in (xbar, sbar)
    want = a_s * (x / a_t + (s_s / a_s - s_t / a_t) * 0.5 * (e_t + model(pred_x, s).eps))
    torch.testing.assert_close(ScaledHeun()(model, x, t, s), want, rtol=1e-12, atol=1e-12)


def test_scaled_heun_equals_heun_on_edm():
    model, grid = _mixture(EDM()), EDM().timesteps(8)
    x = 80 * _noise(4, 8, seed=11)
    torch.testing.assert_close(
        bdia.sample(model, x, grid, ScaledHeun()).x, bdia.sample(model, x, grid, Heun()).x, rtol=1e-12, atol=1e-12
    )


def _vp_t_of_lambda(vp: VP, lam: float) -> float:
    """Lu et al. (2022), the inverse of lambda(t) = log(alpha/sigma) for the linear VP schedule."""
    b0, b1 = vp.beta_min, vp.beta_max
    L = math.log1p(math.exp(-2 * lam))
    return 2 * L / (math.sqrt(b0 * b0 + 2 * (b1 - b0) * L) + b0)


def _lam(vp: VP, t: float) -> float:
    a, s = vp.alpha_sigma(t)
    return math.log(a / s)


def test_dpm_solver_2_matches_algorithm_1_on_vp():
    vp = VP()
    model = _mixture(vp)
    ts = vp.timesteps(6).tolist()
    x = _noise(4, 8, seed=12)
    ours = bdia.sample(model, x, vp.timesteps(6), DPMSolver2()).x
    ref = x
    for t, s in itertools.pairwise(ts):  # Algorithm 1, DPM-Solver-2, r1 = 1/2
        h = _lam(vp, s) - _lam(vp, t)
        s1 = _vp_t_of_lambda(vp, _lam(vp, t) + 0.5 * h)
        (a_t, _), (a_1, g_1), (a_s, g_s) = (vp.alpha_sigma(u) for u in (t, s1, s))
        e_t = model(ref, t).eps
        u = (a_1 / a_t) * ref - g_1 * math.expm1(0.5 * h) * e_t
        ref = (a_s / a_t) * ref - g_s * math.expm1(h) * model(u, s1).eps
    # the midpoint by bisection agrees with the closed form to about 1e-15 in t; the rest is arithmetic
    torch.testing.assert_close(ours, ref, rtol=1e-11, atol=1e-11)


def test_dpm_solver_2_midpoint_is_the_geometric_mean_of_sbar():
    d = DPMSolver2()
    for sch, t, s in ((SD, 500.0, 300.0), (SD, 40.0, 0.0), (VP(), 0.9, 0.1), (EDM(), 80.0, 2.0)):
        m = d.midpoint(sch, t, s)
        assert s < m < t
        assert math.isclose(sch.snr_sbar(m), math.sqrt(sch.snr_sbar(t) * sch.snr_sbar(s)), rel_tol=1e-12)


@pytest.mark.parametrize("integrator", [ScaledHeun(), DPMSolver2()], ids=repr)
def test_second_order_integrators_cost_2n_minus_1_to_sigma_zero(integrator):
    model = CountNFE(_mixture())
    grid = SD.timesteps(10, "trailing", set_alpha_to_one=True)
    bdia.sample(model, _noise(2, 8), grid, integrator)
    assert model.calls == 2 * 10 - 1
    assert type(integrator.first_order) is DDIM and integrator.order == 2 and integrator.nfe == 2
    # BDIA over it: its first-order backward step shares the evaluation (1 more per step than BDIA-DDIM)
    assert BDIA(integrator, 0.5).nfe == 2 and type(BDIA(integrator, 0.5).backward) is DDIM


@pytest.mark.parametrize("integrator", [ScaledHeun(), DPMSolver2()], ids=repr)
def test_bdia_over_scaled_integrators_inverts_exactly(integrator):
    model, grid = _mixture(), SD.timesteps(20, "trailing")
    z = _noise(6, 8)
    solver = BDIA(integrator, 1.0)
    out = bdia.sample(model, z, grid, solver)
    assert relative_error(bdia.invert(model, out, grid, solver).x, z) < 1e-13


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
    assert relative_error(a, b) > 1e-6  # the last steps differ
    out = bdia.sample(model, z, grid, bounded)
    assert relative_error(bdia.invert(model, out, grid, bounded).x, z) < 1e-12


@pytest.mark.parametrize("bad,err", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("1", TypeError)])
def test_bounded_obelm_rejects_bad_bounds(bad, err):
    with pytest.raises(err, match="max_root"):
        OBELM(max_root=bad)
