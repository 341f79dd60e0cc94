"""The exact fixed-point mode: bit-exact step/unstep, round trips, side information, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import bdia
from bdia.exact import Exact, ExactState, default_frac_bits, dequantise, fraction, quantise
from bdia.solvers import BDIA, DDIM, Euler, Heun, obelm_gamma
from tests.conftest import grid, model_for, schedule

INTEGRATORS = {"ddim": DDIM, "euler": Euler, "heun": Heun}
KINDS = ["sd", "cosine", "zsnr", "vp", "edm", "flow"]
DTYPES = [torch.float32, torch.float64]
PROPS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def valid(gamma, kind: str, ts: torch.Tensor) -> bool:
    """O-BELM's per-step gamma falls below 2^-30 next to pure noise on some grids (even to 0, which no mode
    can invert), where the exact mode refuses it (``fraction``: q <= 2^30)."""
    if not callable(gamma):
        return True
    t = ts.tolist()
    return all(2.0**-30 < gamma(schedule(kind), *t[i - 1 : i + 2]) for i in range(1, len(t) - 1))


def start_noise(kind: str, ts: torch.Tensor, shape, dtype, seed: int) -> torch.Tensor:
    k = schedule(kind).at(float(ts[0]))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * math.hypot(k.alpha, k.sigma)).to(dtype)


def same(a: ExactState, b: ExactState) -> bool:
    """Identical bits everywhere: integers, buffer, every spilled word, bookkeeping, floats and times."""
    fa, fb = a.fixed, b.fixed
    return (
        torch.equal(fa.X_prev, fb.X_prev)
        and torch.equal(fa.X, fb.X)
        and torch.equal(fa.buffer, fb.buffer)
        and len(fa.stack) == len(fb.stack)
        and all(torch.equal(u.low, v.low) and u.when == v.when for u, v in zip(fa.stack, fb.stack, strict=True))
        and fa.bound == fb.bound
        and torch.equal(a.x_prev, b.x_prev)
        and torch.equal(a.x, b.x)
        and (a.t_prev, a.t) == (b.t_prev, b.t)
    )


# -- the fraction --------------------------------------------------------------------------------------------


def test_fraction_pinned_cases():
    assert fraction(1.0) == (1, 1)
    assert fraction(0.5) == (1, 2)
    assert fraction(0.1) == (1, 10)
    assert fraction(0.94) == (47, 50)
    assert fraction(1 / 3) == (1, 3)
    assert fraction(2.5) == (5, 2)  # per-step gammas above 1 (O-BELM on some grids)


@given(st.floats(1e-6, 8.0), st.sampled_from([16, 64, 1024]))
def test_fraction_side_information_within_a_tenth_of_a_bit(gamma, max_numerator):
    p, q = fraction(gamma, max_numerator)
    assert 1 <= p <= max_numerator and (p <= q) == (gamma <= 1 or p == q)
    # the buffer grows by log2(q/p) bits per step; the minimum is log2(1/gamma)
    assert abs(math.log2(q / p) - math.log2(1 / gamma)) < 0.1


def test_default_resolution_per_dtype():
    assert default_frac_bits(torch.float32) == 30
    assert default_frac_bits(torch.float64) == 50
    assert default_frac_bits(torch.float16) == 17
    assert default_frac_bits(torch.bfloat16) == 14


# -- bit-exact inverse --------------------------------------------------------------------------------------


gammas = st.one_of(st.floats(0.1, 1.0), st.sampled_from([1.0, 0.5, 0.1, 0.94]), st.just(obelm_gamma))


@PROPS
@given(
    kind=st.sampled_from(KINDS),
    integrator=st.sampled_from(sorted(INTEGRATORS)),
    gamma=gammas,
    dtype=st.sampled_from(DTYPES),
    shape=st.sampled_from([(2, 8), (1, 2, 2, 2), (3, 8)]),
    n=st.integers(3, 12),
    seed=st.integers(0, 2**16),
)
def test_unstep_step_and_step_unstep_are_identities(kind, integrator, gamma, dtype, shape, n, seed):
    model = model_for(kind, None, dim=8)
    ts = grid(kind, n, variant=seed)
    assume(valid(gamma, kind, ts))
    ex = Exact(BDIA(INTEGRATORS[integrator](), gamma))
    times = ts.tolist()
    # a state with a filled buffer: a few steps in
    s = ex.init(model, start_noise(kind, ts, shape, dtype, seed), times[0], times[1])
    states = [s]
    for t in times[2:]:
        s = ex.step(model, s, t)
        states.append(s)
    for i in range(1, len(states)):
        before, after = states[i - 1], states[i]
        assert same(ex.unstep(model, after, before.t_prev), before)
        assert same(ex.step(model, ex.unstep(model, after, before.t_prev), after.t), after)


@PROPS
@given(
    kind=st.sampled_from(KINDS),
    integrator=st.sampled_from(sorted(INTEGRATORS)),
    gamma=gammas,
    dtype=st.sampled_from(DTYPES),
    n=st.integers(2, 30),
    seed=st.integers(0, 2**16),
)
def test_invert_of_sample_is_the_quantised_noise(kind, integrator, gamma, dtype, n, seed):
    model = model_for(kind, None, dim=8)
    ts = grid(kind, n, variant=seed)
    assume(valid(gamma, kind, ts))
    ex = Exact(BDIA(INTEGRATORS[integrator](), gamma))
    noise = start_noise(kind, ts, (2, 8), dtype, seed)
    out = bdia.sample(model, noise, ts, ex)
    back = bdia.invert(model, out, ts, ex)
    k = out.fixed.frac_bits
    X, _ = quantise(noise, k)
    assert torch.equal(back.fixed.X, X)
    assert torch.equal(back.x, dequantise(X, k, dtype))
    assert back.x.dtype == dtype
    # the buffer is emptied exactly on the way back, spilled words included
    assert not bool(back.fixed.buffer.any()) and back.fixed.stack == ()
    # and sampling again from the inverted pair gives the same bits
    assert same(bdia.sample(model, back, ts, ex), out)


@pytest.mark.parametrize(("gamma", "n"), [(0.1, 1000), (1.0, 1000)])
def test_long_walks_round_trip(gamma, n):
    """Hundreds of spills (gamma = 0.1: 3.3 bits per step) and back, on a tiny latent."""
    model = model_for("sd", None, dim=2)
    ts = grid("sd", n, variant=1)
    ex = Exact(BDIA(DDIM(), gamma))
    noise = start_noise("sd", ts, (1, 2), torch.float32, 0)
    out = bdia.sample(model, noise, ts, ex)
    back = bdia.invert(model, out, ts, ex)
    assert torch.equal(back.fixed.X, quantise(noise, out.fixed.frac_bits)[0])
    assert torch.equal(back.x, dequantise(back.fixed.X, out.fixed.frac_bits, torch.float32))
    if gamma < 1:
        assert len(out.fixed.stack) > 0 and back.fixed.stack == ()


@PROPS
@given(
    kind=st.sampled_from(["sd", "vp", "flow", "edm"]),
    gamma=st.floats(0.1, 1.0),
    n=st.integers(2, 40),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_sample_of_invert_is_the_quantised_data(kind, gamma, n, dtype, seed):
    """From real data the inverted latent grows like gamma^-N (the recurrence's parasitic root, not rounding:
    float64 BDIA inverts to the same huge latent), so N is kept where it fits int64 at k = 30 (61 - 30 bits of
    room, of which the data's scale and the growth's constant take a few): N log2(1/gamma) <= 24."""
    n = max(2, min(n, int(24 / max(math.log2(1 / gamma), 1e-9))))
    model = model_for(kind, None, dim=8)
    ts = grid(kind, n, variant=seed)
    ex = Exact(BDIA(DDIM(), gamma), frac_bits=30)
    x0 = model.sample(2, torch.Generator().manual_seed(seed)).to(dtype)
    z = bdia.invert(model, x0, ts, ex)
    rec = bdia.sample(model, z, ts, ex)
    assert torch.equal(rec.fixed.X, quantise(x0, rec.fixed.frac_bits)[0])
    assert torch.equal(rec.x, dequantise(rec.fixed.X, rec.fixed.frac_bits, dtype))


def test_sample_of_invert_at_1000_steps_gamma_one():
    model = model_for("sd", None, dim=2)
    ts = grid("sd", 1000, variant=1)
    ex = Exact(BDIA(DDIM(), 1.0))
    x0 = model.sample(1, torch.Generator().manual_seed(3)).float()
    rec = bdia.sample(model, bdia.invert(model, x0, ts, ex), ts, ex)
    assert torch.equal(rec.fixed.X, quantise(x0, rec.fixed.frac_bits)[0])


def test_int64_overflow_is_reported_not_wrapped():
    """gamma = 0.1 over 30 steps from data needs ~100 integer bits: sample's finite check must raise."""
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 30, variant=1)
    x0 = model.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(FloatingPointError, match="non-finite"):
        bdia.invert(model, x0, ts, Exact(BDIA(DDIM(), 0.1)))


# -- accuracy and side information -------------------------------------------------------------------------


RESOLUTION_CASES = [(kind, 1, g) for kind in ("sd", "edm", "flow") for g in (1.0, 0.94, 0.5, 0.1)]
RESOLUTION_CASES.append(("edm", 2, obelm_gamma))  # O-BELM's gammas here: 0.37 ... 0.78
RESOLUTION_CASES.append(("sd", 0, obelm_gamma))  # and here: 0.011 ... 2.8


@pytest.mark.parametrize(("kind", "variant", "gamma"), RESOLUTION_CASES)
def test_exact_sample_is_the_float_sample_to_the_resolution(kind, variant, gamma):
    """Each step rounds by less than (p + 1/2) 2^-k (p <= 1024 the fraction's numerator); sampling is stable,
    so errors add up over N steps; the float64 reference itself rounds by ~eps |x| per step."""
    model = model_for(kind, None, dim=8)
    n = 40
    ts = grid(kind, n, variant=variant)
    assert valid(gamma, kind, ts)
    ex = Exact(BDIA(DDIM(), gamma))
    noise = start_noise(kind, ts, (4, 8), torch.float64, 0)
    out = bdia.sample(model, noise, ts, ex)
    ref = bdia.sample(model, noise, ts, ex.surrogate)
    scale = float(noise.abs().max())
    bound = n * ((1024 + 0.5) * 2.0**-out.fixed.frac_bits + 16 * torch.finfo(torch.float64).eps * scale)
    err = float((out.x - ref.x).abs().max())
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("gamma", [0.94, 0.5, 0.1, 0.02])
def test_side_information_is_log2_inverse_gamma_per_step(gamma):
    model = model_for("sd", None, dim=8)
    n = 60
    ts = grid("sd", n, variant=1)
    ex = Exact(BDIA(DDIM(), gamma))
    out = bdia.sample(model, start_noise("sd", ts, (64, 8), torch.float64, 1), ts, ex)
    info = Exact.side_information(out)
    per_step = info.bits / (n - 1)  # the first step is a plain integrator step
    assert abs(per_step - math.log2(1 / gamma)) < 0.1, per_step
    assert info.bytes == 8 + 4 * info.spills
    assert info.spills == len(out.fixed.stack)
    assert Exact.side_information(bdia.invert(model, out, ts, ex)).bits == 0


def test_gamma_one_keeps_no_side_information():
    model = model_for("flow", None, dim=8)
    ts = grid("flow", 30)
    out = bdia.sample(model, torch.randn(2, 8), ts, Exact(BDIA(DDIM(), 1.0)))
    assert Exact.side_information(out).bits == 0 and out.fixed.stack == ()


# -- states and conveniences ---------------------------------------------------------------------------------


def test_a_plain_float_state_is_quantised_and_continued():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 20, variant=1)
    half = bdia.sample(model, torch.randn(2, 8, dtype=torch.float64), ts[:10], BDIA(DDIM(), 1.0))
    assert not isinstance(half, ExactState)
    ex = Exact(BDIA(DDIM(), 0.5))
    with pytest.raises(ValueError, match="made by another solver"):  # a state knows the solver that made it
        bdia.sample(model, half, ts[8:], ex)
    half = half.replace(solver=None)  # continued deliberately with another solver
    out = bdia.sample(model, half, ts[8:], ex)
    back = bdia.invert(model, out, ts[8:], ex)
    k = out.fixed.frac_bits
    # invert reports the pair in its walk's orientation: x is the latent it ended on, at ts[8]
    assert (back.t, back.t_prev) == (half.t_prev, half.t)
    assert torch.equal(back.fixed.X, quantise(half.x_prev, k)[0])
    assert torch.equal(back.fixed.X_prev, quantise(half.x, k)[0])


def test_flipped_is_an_involution_and_keeps_the_buffer():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 10, variant=1)
    out = bdia.sample(model, torch.randn(2, 8), ts, Exact(BDIA(DDIM(), 0.5)))
    f = out.flipped()
    assert isinstance(f, ExactState) and torch.equal(f.fixed.X, out.fixed.X_prev)
    assert f.fixed.buffer is out.fixed.buffer
    assert same(f.flipped(), out)


def test_model_sees_the_dequantised_state_in_the_callers_dtype():
    seen = []
    base = model_for("sd", None, dim=8)

    class Spy:
        schedule = base.schedule

        def __call__(self, x, t, **kw):
            seen.append(x)
            return base(x, t, **kw)

    ts = grid("sd", 5, variant=1)
    out = bdia.sample(Spy(), torch.randn(2, 8), ts, Exact(BDIA(DDIM(), 0.5), frac_bits=12))
    for x in seen:
        assert x.dtype == torch.float32
        assert torch.equal(x, torch.round(x * 2**12) / 2**12)  # on the 2^-12 grid
    assert out.fixed.frac_bits == 12


def test_deterministic_flag_restores_the_global_setting():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 5, variant=1)
    before = torch.are_deterministic_algorithms_enabled()
    bdia.sample(model, torch.randn(2, 8), ts, Exact(BDIA(DDIM(), 0.5), deterministic=True))
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_with_a_convolutional_net_is_exact():
    from bdia.models import Model

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 4, 3, padding=1)
    ).cuda()
    sch = schedule("sd")
    model = Model(lambda x, t: net(x) * 0.1, sch)
    ts = grid("sd", 50, variant=1)
    ex = Exact(BDIA(DDIM(), 0.5), deterministic=True)
    noise = torch.randn(2, 4, 16, 16, device="cuda")
    with torch.no_grad():
        out = bdia.sample(model, noise, ts, ex)
        back = bdia.invert(model, out, ts, ex)
    assert torch.equal(back.fixed.X, quantise(noise, out.fixed.frac_bits)[0])


# -- errors ---------------------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="gamma must lie in \\(0, 1024\\]"):
        fraction(0.0)
    with pytest.raises(ValueError, match="gamma must lie in \\(0, 16\\]"):
        fraction(17.0, 16)
    with pytest.raises(ValueError, match="too small"):
        fraction(1e-12)
    with pytest.raises(TypeError, match="gamma must be a python float"):
        fraction(torch.tensor(0.5))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="solver must be a bdia.solvers.BDIA"):
        Exact(DDIM())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="per-sample tensor"):
        Exact(BDIA(DDIM(), torch.tensor([0.5, 0.6], dtype=torch.float64)))
    with pytest.raises(ValueError, match="frac_bits must lie in"):
        Exact(BDIA(), frac_bits=70)
    with pytest.raises(TypeError, match="frac_bits must be an int"):
        Exact(BDIA(), frac_bits=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_numerator"):
        Exact(BDIA(), max_numerator=0)
    with pytest.raises(TypeError, match="state dtype must be floating point"):
        default_frac_bits(torch.int64)


def test_gamma_zero_cannot_be_inverted():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 5, variant=1)
    with pytest.raises(ValueError, match="Exact\\(BDIA\\(gamma=0\\)\\) cannot be inverted"):
        Exact(BDIA(DDIM(), 0.0))  # refused when configured, before any walk or model call
    per_step = Exact(BDIA(DDIM(), lambda s, tp, t, tn: 0.0))  # a gamma of 0 at some step is found by the walk
    with pytest.raises(ValueError, match="gamma must lie in \\(0, 1024\\]"):
        bdia.sample(model, torch.randn(2, 8), ts, per_step)


def test_mismatched_resolution_is_refused():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 5, variant=1)
    out = bdia.sample(model, torch.randn(2, 8), ts, Exact(BDIA(), frac_bits=20))
    with pytest.raises(ValueError, match="frac_bits=20.*frac_bits=24.*made by another solver"):
        bdia.invert(model, out, ts, Exact(BDIA(), frac_bits=24))
    with pytest.raises(ValueError, match="frac_bits=20 but this solver uses frac_bits=24"):  # an anonymous pair
        bdia.invert(model, out.replace(solver=None), ts, Exact(BDIA(), frac_bits=24))


def test_a_state_is_never_modified_in_place():
    model = model_for("sd", None, dim=8)
    ts = grid("sd", 6, variant=1)
    ex = Exact(BDIA(DDIM(), 0.3))
    s = bdia.sample(model, torch.randn(2, 8), ts[:4], ex)  # the pair at (ts[2], ts[3])
    f = s.fixed
    snapshot = [t.clone() for t in (f.X_prev, f.X, f.buffer, s.x, s.x_prev)]
    ex.step(model, s, float(ts[4]))
    ex.unstep(model, s, float(ts[1]))
    for a, b in zip(snapshot, (f.X_prev, f.X, f.buffer, s.x, s.x_prev), strict=True):
        assert torch.equal(a, b)
