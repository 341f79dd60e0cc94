"""``bdia._linalg`` (internal): the one arithmetic kernel of every step (merging, factoring, half precision, NaN)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bdia._linalg import factored, lincomb
from bdia.models import GaussianMixture, Model
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM, Euler
from bdia.state import State

coef = st.floats(-1e3, 1e3, allow_nan=False).filter(lambda c: c == 0 or abs(c) > 1e-3)


@settings(max_examples=60, deadline=None)
@given(cs=st.lists(coef, min_size=1, max_size=6), picks=st.lists(st.integers(0, 2), min_size=6, max_size=6))
def test_factored_is_the_sum_and_never_touches_its_inputs(cs, picks):
    g = torch.Generator().manual_seed(0)
    pool = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    copies = [p.clone() for p in pool]
    terms = [(c, pool[k]) for c, k in zip(cs, picks, strict=False)]
    exact = sum(c * pool[k] for c, k in zip(cs, picks, strict=False))
    s, T = factored(*terms)
    assert all(T is not p and T.data_ptr() != p.data_ptr() for p in pool)
    scale = sum(abs(c) for c in cs) * max(float(p.abs().max()) for p in pool)
    assert float((s * T - exact).abs().max()) <= 8 * 2**-52 * scale
    assert float((lincomb(*terms) - exact).abs().max()) <= 8 * 2**-52 * scale
    merged = {}
    for c, k in zip(cs, picks, strict=False):
        merged[k] = merged.get(k, 0.0) + c
    if any(v != 0 for v in merged.values()):  # the largest merged coefficient is factored out
        assert abs(s) == max(abs(v) for v in merged.values())
    assert all(torch.equal(p, q) for p, q in zip(pool, copies, strict=True))


def test_factoring_leaves_ratios_in_unit_range_so_nothing_overflows():
    x = torch.full((3,), 3e38, dtype=torch.float32)  # near float32's maximum
    y = torch.full((3,), 1e10, dtype=torch.float32)
    s, T = factored((1e-30, x), (1.0, y))  # factoring 1e-30 out instead would make y's ratio 1e30: 1e40 overflows
    assert s == 1.0 and bool(torch.isfinite(T).all())
    assert torch.allclose(s * T.double(), torch.full((3,), 1e10 + 3e8, dtype=torch.float64), rtol=1e-6)


def test_half_precision_is_summed_in_float32_and_not_factored():
    a = torch.full((4,), 60000.0, dtype=torch.float16)
    b = torch.full((4,), 60000.0, dtype=torch.float16)
    s, T = factored((2.0, a), (-2.0, b), (1.0, torch.ones(4, dtype=torch.float16)))
    assert s == 1.0 and T.dtype == torch.float16 and torch.equal(T, torch.ones(4, dtype=torch.float16))


def test_nan_coefficients_show_in_the_result():
    x = torch.ones(3)
    assert bool(torch.isnan(lincomb((math.nan, x))).all())
    s, T = factored((math.nan, x), (1.0, torch.zeros(3)))
    assert bool(torch.isnan(s * T).all())


def test_per_sample_coefficients_are_applied_per_sample():
    x = torch.ones(3, 2, dtype=torch.float64)
    c = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).reshape(3, 1)
    s, T = factored((c, x), (0.5, x))
    assert s == 1.0 and torch.equal(T, torch.tensor([[1.5] * 2, [2.5] * 2, [3.5] * 2], dtype=torch.float64))


def test_precomputed_bdia_step_equals_the_term_by_term_update():
    """BDIA over an affine integrator folds its update into three numbers per grid point; the result is the
    paper's update written term by term, to rounding, for gamma = 1 (two passes) and gamma != 1 (three)."""
    sd = DiscreteVP.stable_diffusion()
    gm = GaussianMixture.random(sd, dim=6, components=3, seed=1)
    g = torch.Generator().manual_seed(3)
    x, x_prev = (torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(2))
    tp, t, tn = 801.0, 781.0, 761.0
    for integrator in (DDIM(), Euler()):
        for gamma in (1.0, 0.5, 0.0):
            x0, eps = gm(x, t)
            fwd = integrator(gm, x, t, tn)
            back = integrator(gm, x, t, tp)
            want = fwd + gamma * (x_prev - back)
            got = BDIA(integrator, gamma).step(gm, State(x_prev, x, tp, t), tn).x
            assert torch.allclose(got, want, rtol=0, atol=1e-13), (integrator, gamma)
            A, B, C = integrator.coefficients(sd, t, tn)
            assert torch.allclose(fwd, A * x + B * x0 + C * eps, rtol=0, atol=1e-13)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v"])
@pytest.mark.parametrize("gamma", [1.0, 0.5, 0.0])
def test_bdia_drift_is_its_coefficients_applied_to_the_prediction(prediction, gamma):
    """F's coefficients on (x, x0, eps), folded by a Model's prediction onto (x, network output): the same bits as
    ``Prediction.factored`` of those coefficients, which every other denoiser goes through."""
    s = DiscreteVP.stable_diffusion()
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    model = Model(lambda z, t: out, s, prediction)
    solver = BDIA(DDIM(), gamma=gamma)
    for t_prev, t, t_next in [(981.0, 961.0, 941.0), (41.0, 21.0, 1.0), (21.0, 1.0, -1.0)]:
        F = solver.drift(model, x, t_prev, t, t_next)
        A, B, C = solver.coefficients(s, t_prev, t, t_next, gamma)
        scale, T = model(x, t).factored(A, x, B, C)
        assert F.scale == scale and torch.equal(F.T, T)
