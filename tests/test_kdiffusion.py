"""bdia.kdiffusion against k-diffusion's convention: its sample_euler / sample_heun (s_churn = 0) transcribed here from
Karras et al. 2022 (Algorithm 1, Euler and Heun steps on dx/dsigma = (x - D(x, sigma)) / sigma) and k-diffusion's
documented sampler signature and callback; the real k-diffusion when it is installed.

Tolerance (as in test_properties): rounding of relative size eps at each of N steps on states of norm up to M,
carried without growth: |a - b| <= C * eps(dtype) * N * M, C = 4.
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bdia
from bdia.kdiffusion import invert_bdia, sample_bdia
from bdia.models import GaussianMixture, Model
from bdia.schedules import EDM
from bdia.solvers import BDIA, Euler, Heun
from bdia.state import State

C = 4.0
GMM = GaussianMixture.random(EDM(1000.0), dim=8, components=3, std=0.5, seed=1)  # any sigma a test draws


def denoiser(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The mixture's exact x0 as a Karras denoiser, called as k-diffusion calls one."""
    return GMM(x, float(sigma[0]), labels=labels).x0


class Counted:
    def __init__(self, model=denoiser):
        self.model, self.calls, self.sigmas = model, 0, []

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        self.sigmas.append(sigma)
        return self.model(x, sigma, **kw)


def karras_sigmas(n: int, dtype=torch.float32, zero: bool = True) -> torch.Tensor:
    """Karras et al.'s eq. 5 grid as k-diffusion's get_sigmas_karras makes it: float32, then a trailing 0."""
    return EDM().timesteps(n, final_zero=zero).to(dtype)


def noise(sigmas: torch.Tensor, dtype: torch.dtype, batch: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, GMM.dim, generator=g, dtype=torch.float64) * float(sigmas[0])).to(dtype)


# k-diffusion's sample_euler and sample_heun with s_churn = 0 (sigma_hat = sigma_i), in the latent's dtype with
# sigma and dt as 0-d tensors of the sigmas' dtype, as k-diffusion computes them.
def karras_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def karras_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:  # Euler on the last step to sigma = 0
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


REFERENCES = {"euler": (karras_euler, Euler), "heun": (karras_heun, Heun)}


def assert_close_to_rounding(a: torch.Tensor, b: torch.Tensor, n: int, m: float) -> None:
    bound = C * torch.finfo(b.dtype).eps * n * m
    err = float((a.double() - b.double()).norm())
    assert a.dtype == b.dtype and a.shape == b.shape
    assert err <= bound, f"error {err:.3e} exceeds the rounding bound {bound:.3e}"


def steps_weight(sigmas: torch.Tensor, heun: bool) -> float:
    """N in the bound, with each Heun step weighted by its conditioning: the corrector's x0-model slope
    (x_2 - D(x_2)) / sigma_next enters with the factor |dt| / (2 sigma_next), so rounding in the predictor x_2 grows
    by that much on a step that shrinks sigma a lot (1 -> 1/64: 31x, in k-diffusion's arithmetic as in bdia's)."""
    s = sigmas.tolist()
    return sum(max(1.0, (a - b) / (2 * b)) if heun and b > 0 else 1.0 for a, b in itertools.pairwise(s))


def walk(reference, x, sigmas, **kw):
    """The reference's result and the norm of the largest latent on its walk."""
    norms = [float(x.double().norm())]
    out = reference(denoiser, x, sigmas, callback=lambda d: norms.append(float(d["x"].double().norm())), **kw)
    return out, max(norms)


# gamma = 0 is the plain integrator: k-diffusion's samplers


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize(("dtype", "sigma_dtype"), [(torch.float32, torch.float32), (torch.float64, torch.float64)])
@pytest.mark.parametrize("zero", [True, False], ids=["to0", "tomin"])
def test_gamma_0_is_k_diffusion_sampler(name, dtype, sigma_dtype, zero):
    reference, integrator = REFERENCES[name]
    sigmas = karras_sigmas(18, sigma_dtype, zero)
    x = noise(sigmas, dtype)
    want, m = walk(reference, x, sigmas)
    got = sample_bdia(denoiser, x, sigmas, gamma=0.0, integrator=integrator(), disable=True)
    assert_close_to_rounding(got, want, len(sigmas) - 1, m)
    # and gamma = 1 is a different scheme (the comparison can fail)
    other = sample_bdia(denoiser, x, sigmas, gamma=1.0, integrator=integrator(), disable=True)
    assert float((other - want).norm()) > 10 * C * torch.finfo(dtype).eps * len(sigmas) * m


def test_euler_default_and_not_bit_exact_but_equal_to_bdia_euler_to_the_bit():
    """Not bit-exact with k-diffusion: bdia merges each step's coefficients in float64 first, x_next = (1 + h/sigma) x
    - (h/sigma) D, one factored combination, where k-diffusion rounds x - D, then / sigma, then * dt and + x, with dt
    rounded in the sigmas' dtype. It is bdia's own Euler, and BDIA over it, to the bit."""
    sigmas = karras_sigmas(18)
    x = noise(sigmas, torch.float32)
    got = sample_bdia(denoiser, x, sigmas, gamma=0.0, disable=True)  # integrator defaults to Euler
    assert not torch.equal(got, karras_euler(denoiser, x, sigmas))
    model = Model(denoiser, EDM(80.0), "sample", time_dtype=torch.float32)
    ts = sigmas.double()
    assert torch.equal(got, bdia.sample(model, x, ts, Euler()).x)
    for gamma in (0.5, 1.0):
        ours = sample_bdia(denoiser, x, sigmas, gamma=gamma, disable=True)
        assert torch.equal(ours, bdia.sample(model, x, ts, BDIA(Euler(), gamma)).x)


def test_float32_sigmas_with_float64_latent_keeps_exact_time_differences():
    """k-diffusion rounds dt = sigmas[i+1] - sigmas[i] in float32; bdia's float64 grid holds the float32 sigmas
    exactly and subtracts them exactly: it agrees with the reference run on float64 sigmas."""
    sigmas = karras_sigmas(18, torch.float32)
    x = noise(sigmas, torch.float64)
    got = sample_bdia(denoiser, x, sigmas, gamma=0.0, disable=True)
    exact_dt, m = walk(karras_euler, x, sigmas.double())
    assert_close_to_rounding(got, exact_dt, 18, m)


# the callback dict, conditioning, NFE, dtype and device


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_callback_dict(name, gamma):
    reference, integrator = REFERENCES[name]
    sigmas = karras_sigmas(10)
    x = noise(sigmas, torch.float32)
    seen: list[dict] = []
    out = sample_bdia(denoiser, x, sigmas, callback=seen.append, gamma=gamma, integrator=integrator(), disable=True)
    path: list[State] = []  # the latents the same walk reaches, from bdia's own loop
    model = Model(denoiser, EDM(80.0), "sample", time_dtype=torch.float32)
    bdia.sample(model, x, sigmas.double(), BDIA(integrator(), gamma), callback=lambda st: path.append(st.state))
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 1))
    for d, step in zip(seen, path, strict=True):
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        i = d["i"]
        assert torch.equal(d["sigma"], sigmas[i]) and torch.equal(d["sigma_hat"], sigmas[i])
        assert d["sigma"].dtype == sigmas.dtype and d["sigma"].dim() == 0
        assert torch.equal(d["x"], x if i == 0 else path[i - 1].x)  # the latent at sigmas[i] ...
        assert torch.equal(d["x"], step.x_prev)
        assert torch.equal(d["denoised"], denoiser(d["x"], sigmas[i].expand(4)))  # ... and its own x0
    assert torch.equal(out, path[-1].x)
    if gamma == 0:  # what k-diffusion's own callback reports, to rounding
        want: list[dict] = []
        reference(denoiser, x, sigmas, callback=want.append)
        m = max(float(d["x"].norm()) for d in want)
        for d, w in zip(seen, want, strict=True):
            assert d["i"] == w["i"] and torch.equal(d["sigma"], w["sigma"])
            assert_close_to_rounding(d["x"], w["x"], len(sigmas), m)


def test_callback_when_inverting_and_when_continuing_a_pair():
    sigmas = karras_sigmas(8)
    x = noise(sigmas, torch.float64)
    state = sample_bdia(denoiser, x, sigmas, disable=True, return_state=True)
    seen: list[dict] = []
    back = invert_bdia(denoiser, state, sigmas, callback=seen.append, disable=True, return_state=True)
    # the pair (sigma_{N-1}, 0) is given: each step denoises its shared point, from sigma_{N-1} up to sigma_1
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 2, 0, -1))
    for d in seen:
        assert torch.equal(d["denoised"], denoiser(d["x"], d["sigma"].expand(4)))
    # data at sigma_min > 0: the inversion's first step denoises the data itself, at i = N - 1
    seen.clear()
    invert_bdia(denoiser, state.x_prev, sigmas[:-1], callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(len(sigmas) - 2, 0, -1))
    assert torch.equal(seen[0]["x"], state.x_prev)
    # sampling from an inverted pair: step 0 was taken by the inversion, so the callback starts at i = 1
    seen.clear()
    sample_bdia(denoiser, back, sigmas, callback=seen.append, disable=True)
    assert [d["i"] for d in seen] == list(range(1, len(sigmas) - 1))
    assert torch.equal(seen[0]["x"], back.x_prev)


def test_extra_args_reach_every_call():
    sigmas = karras_sigmas(12, torch.float64)
    x = noise(sigmas, torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    for reference, integrator in REFERENCES.values():
        counted = Counted(lambda x, s, labels: denoiser(x, s, labels=labels))  # fails without labels
        got = sample_bdia(counted, x, sigmas, {"labels": labels}, gamma=0.0, integrator=integrator(), disable=True)
        want, m = walk(reference, x, sigmas, extra_args={"labels": labels})
        assert_close_to_rounding(got, want, len(sigmas) - 1, m)
        uncond = sample_bdia(denoiser, x, sigmas, gamma=0.0, integrator=integrator(), disable=True)
        assert float((got - uncond).norm()) > 0.1 * float(uncond.norm())
        state = sample_bdia(counted, x, sigmas, {"labels": labels}, integrator=integrator(), return_state=True)
        back = invert_bdia(counted, state, sigmas, {"labels": labels}, integrator=integrator(), disable=True)
        assert_close_to_rounding(back, x, 2 * len(sigmas), float(x.norm()))


@pytest.mark.parametrize(("name", "zero", "nfe"), [("euler", True, 18), ("euler", False, 17), ("heun", True, 35),
                                                   ("heun", False, 34)])  # fmt: skip
def test_nfe_matches_k_diffusion(name, zero, nfe):
    reference, integrator = REFERENCES[name]
    sigmas = karras_sigmas(18, zero=zero)
    x = noise(sigmas, torch.float32)
    ours, theirs = Counted(), Counted()
    state = sample_bdia(ours, x, sigmas, integrator=integrator(), disable=True, return_state=True)
    reference(theirs, x, sigmas)
    assert ours.calls == theirs.calls == nfe
    back = Counted()
    invert_bdia(back, state, sigmas, integrator=integrator(), disable=True)
    # the inversion's N - 1 steps: one call each over Euler; two over Heun, but one from the pair's sigma = 0 end
    assert back.calls == (len(sigmas) - 2 if name == "euler" else 2 * (len(sigmas) - 2) - zero)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_dtype_kept_sigma_as_k_diffusion_passes_it_and_inputs_untouched(dtype):
    sigmas = karras_sigmas(6)
    x = noise(sigmas, dtype)
    x_copy, sigmas_copy = x.clone(), sigmas.clone()
    ours, theirs = Counted(), Counted()
    half = dtype in (torch.float16, torch.bfloat16)
    if half:  # gamma = 1 keeps the rounding of the sigma-80 latents: the size of the data in half precision
        with pytest.raises(ValueError, match="can amplify rounding errors"):
            sample_bdia(ours, x, sigmas, integrator=Heun(), disable=True)
        assert ours.sigmas == []  # refused before any model call
    out = sample_bdia(ours, x, sigmas, integrator=Heun(), disable=True, max_amplification=math.inf if half else None)
    karras_heun(theirs, x, sigmas)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    for a, b in zip(ours.sigmas, theirs.sigmas, strict=True):  # shape (batch,), the latent's dtype, same values
        assert a.dtype == b.dtype == dtype and a.shape == b.shape == (4,) and torch.equal(a, b)
    assert torch.equal(x, x_copy) and torch.equal(sigmas, sigmas_copy)


def test_returns_without_a_graph_like_k_diffusion():
    sigmas = karras_sigmas(4)
    x = noise(sigmas, torch.float32).requires_grad_()
    assert not sample_bdia(denoiser, x, sigmas, disable=True).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_sigmas_and_latent_on_the_device():
    sigmas = karras_sigmas(10)
    x = noise(sigmas, torch.float32)
    cpu = sample_bdia(denoiser, x, sigmas, disable=True, return_state=True)
    dev = sample_bdia(denoiser, x.cuda(), sigmas.cuda(), disable=True, return_state=True)
    assert dev.x.device.type == "cuda" and dev.x.dtype == torch.float32
    assert_close_to_rounding(dev.x.cpu(), cpu.x, 10, float(x.norm()))
    back = invert_bdia(denoiser, dev, sigmas.cuda(), disable=True)
    assert back.device.type == "cuda"
    assert_close_to_rounding(back.cpu(), x, 20, float(x.norm()))


def test_progress_bar_follows_disable(capsys):
    sigmas = karras_sigmas(4)
    x = noise(sigmas, torch.float32)
    sample_bdia(denoiser, x, sigmas, disable=True)
    assert capsys.readouterr().err == ""
    sample_bdia(denoiser, x, sigmas, disable=False)
    assert "4/4" in capsys.readouterr().err


def test_signature_is_k_diffusion_s():
    """Callers pass (model, x, sigmas, extra_args, callback, disable) positionally or by name."""
    for f in (sample_bdia, invert_bdia):
        params = list(inspect.signature(f).parameters.values())[:6]
        assert [p.name for p in params] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]
        assert [p.default for p in params[3:]] == [None, None, None]


# round trips


@pytest.mark.parametrize("integrator", [Euler, Heun])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sample_then_invert_returns_the_noise(integrator, dtype):
    sigmas = karras_sigmas(18)
    x = noise(sigmas, dtype)
    state = sample_bdia(denoiser, x, sigmas, integrator=integrator(), disable=True, return_state=True)
    assert isinstance(state, State) and state.t == 0.0
    back = invert_bdia(denoiser, state, sigmas, integrator=integrator(), disable=True)
    assert_close_to_rounding(back, x, 2 * len(sigmas), float(x.double().norm()))
    rel = float((back.double() - x.double()).norm() / x.double().norm())
    assert rel < {torch.float64: 1e-14, torch.float32: 1e-6}[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_invert_real_data_then_sample_returns_it(dtype):
    """Data at sigma_min > 0 (the grid without its trailing 0): the inverted pair samples back to the data."""
    sigmas = karras_sigmas(18, zero=False)
    data = GMM.sample(4, generator=torch.Generator().manual_seed(3)).to(dtype)
    z = invert_bdia(denoiser, data, sigmas, disable=True, return_state=True)
    assert z.t == float(sigmas[0]) and z.x.dtype == dtype
    assert 0.5 < float(z.x.double().std()) / float(sigmas[0]) < 2  # at the scale of the noise
    again = sample_bdia(denoiser, z, sigmas, disable=True)
    m = max(float(data.double().norm()), float(z.x.double().norm()))
    assert_close_to_rounding(again, data, 2 * len(sigmas), m)
    # from the bare inverted latent the pair is regenerated and exactness is lost
    assert float((sample_bdia(denoiser, z.x, sigmas, disable=True) - data).double().norm()) > 1e-3


PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    st.lists(st.floats(0.01, 80.0), min_size=2, max_size=12, unique=True),
    st.booleans(),
    st.sampled_from(["euler", "heun"]),
    st.integers(0, 2**16),
)
def test_any_sigmas_gamma_0_is_the_reference(values, zero, name, seed):
    reference, integrator = REFERENCES[name]
    sigmas = torch.tensor(sorted(values, reverse=True) + ([0.0] if zero else []), dtype=torch.float64)
    x = noise(sigmas, torch.float64, seed=seed)
    want, m = walk(reference, x, sigmas)
    got = sample_bdia(denoiser, x, sigmas, gamma=0.0, integrator=integrator(), disable=True)
    assert_close_to_rounding(got, want, steps_weight(sigmas, name == "heun"), m)


@st.composite
def k_diffusion_grids(draw) -> torch.Tensor:
    """The grids k-diffusion's helpers make: Karras et al.'s eq. 5 (get_sigmas_karras) or log-linear
    (get_sigmas_exponential), with or without the trailing 0, with at least 5 sigmas.

    Fewer points with a wide range make every step shrink sigma ~100-fold, and BDIA's two-step recurrence then
    amplifies a late step's rounding on the way back: measured on 300 draws, Heun round trips reached 3.3 times the
    bound's eps M 2N on 4 log-linear points from ~150 to ~0.01 (step ratio 122), against at most 0.16 from 5 points on.
    """
    n = draw(st.integers(5, 30))
    lo, hi = draw(st.floats(1e-3, 0.1)), draw(st.floats(1.0, 160.0))
    if draw(st.booleans()):
        sigmas = EDM(hi).timesteps(n, sigma_min=lo, sigma_max=hi, rho=draw(st.floats(1.0, 10.0)), final_zero=False)
    else:
        sigmas = torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if draw(st.booleans()) else sigmas


@PROPERTY
@given(k_diffusion_grids(), st.sampled_from(["euler", "heun"]), st.sampled_from([torch.float64, torch.float32]))
def test_round_trip_on_k_diffusion_grids(sigmas, name, dtype):
    integrator = REFERENCES[name][1]
    x = noise(sigmas, dtype, seed=len(sigmas))
    path: list[dict] = []
    state = sample_bdia(denoiser, x, sigmas, None, path.append, True, integrator=integrator(), return_state=True)
    back = invert_bdia(denoiser, state, sigmas, integrator=integrator(), disable=True)
    m = max(float(d["x"].double().norm()) for d in [*path, {"x": state.x}])
    assert_close_to_rounding(back, x, 2 * len(sigmas), m)


# bad input


def test_bad_input_errors():
    sigmas = karras_sigmas(6)
    x = noise(sigmas, torch.float32)
    cases = [
        (dict(sigmas=sigmas.tolist()), TypeError, "sigmas must be a 1-D torch.Tensor"),
        (dict(sigmas=torch.tensor([3, 2, 1, 0])), TypeError, "sigmas must be a floating-point"),
        (dict(sigmas=sigmas[None]), ValueError, "sigmas must be 1-D"),
        (dict(sigmas=sigmas[:1]), ValueError, "at least 2"),
        (dict(sigmas=torch.tensor([80.0, 10.0, 10.0, 0.0])), ValueError, "strictly decreasing"),
        (dict(sigmas=sigmas.flip(0)), ValueError, "strictly decreasing"),
        (dict(sigmas=torch.tensor([80.0, 1.0, -1.0])), ValueError, "non-negative"),
        (dict(sigmas=torch.tensor([float("inf"), 1.0, 0.0])), ValueError, "finite"),
        (dict(sigmas=torch.tensor([80.0, float("nan"), 0.0])), ValueError, "finite"),
        (dict(x=x.tolist()), TypeError, "x must be a torch.Tensor or a bdia.State"),
        (dict(gamma=1.5), ValueError, r"gamma must lie in \[0, 1\]"),
        (dict(gamma=-0.1), ValueError, r"gamma must lie in \[0, 1\]"),
        (dict(integrator=BDIA()), TypeError, "integrator must be a bdia.solvers.Integrator"),
        (dict(extra_args=[1]), TypeError, "extra_args must be a dict"),
        (dict(model="unet"), TypeError, "model must be a Karras denoiser"),
        (dict(callback=1), TypeError, "callback must be callable"),
        (dict(disable="yes"), TypeError, "disable must be a bool"),
    ]
    for f in (sample_bdia, invert_bdia):
        for bad, error, match in cases:
            args = dict(model=denoiser, x=x, sigmas=sigmas, disable=True) | bad
            with pytest.raises(error, match=match):
                f(**args)


def test_bad_states_and_inversions():
    sigmas = karras_sigmas(6)
    x = noise(sigmas, torch.float32)
    state = sample_bdia(denoiser, x, sigmas, disable=True, return_state=True)
    other = EDM().timesteps(6, sigma_min=0.01).float()  # a grid whose last pair is not the state's
    with pytest.raises(ValueError, match="do not continue this grid"):
        invert_bdia(denoiser, state, other, disable=True)
    # Karras grids of any length end with (0.002, 0): the state knows its grid and refuses another one that shares
    # its last pair; lifting that check runs the (approximate) walk deliberately
    with pytest.raises(ValueError, match="made on a grid whose next time"):
        invert_bdia(denoiser, state, karras_sigmas(7), disable=True)
    assert torch.isfinite(invert_bdia(denoiser, state.replace(grid=None), karras_sigmas(7), disable=True)).all()
    with pytest.raises(ValueError, match="do not continue this grid"):  # a sample is not a start for sampling
        sample_bdia(denoiser, state, sigmas, disable=True)
    # clean data at sigma = 0: x0 = x and the noise predicted at the next sigma, then exact from that pair
    z = invert_bdia(denoiser, state.x, sigmas, disable=True, return_state=True)
    back = sample_bdia(denoiser, z, sigmas, disable=True)
    # float32 rounding at the noise's scale (80x the data's) over the walk back
    assert torch.isfinite(z.x).all() and float((back - state.x).norm() / state.x.norm()) < 1e-3
    with pytest.raises(ValueError, match="gamma = 0 .* cannot be inverted"):
        invert_bdia(denoiser, state, sigmas, gamma=0.0, disable=True)


# the real k-diffusion, where it is installed (it needs torchvision, so the test extra does not pull it)


def test_against_the_real_k_diffusion():
    sampling = pytest.importorskip("k_diffusion.sampling")
    sigmas = sampling.get_sigmas_karras(18, 0.002, 80.0)
    for dtype in (torch.float32, torch.float64):
        x = noise(sigmas, dtype)
        for ref, integrator in ((sampling.sample_euler, Euler), (sampling.sample_heun, Heun)):
            want = ref(denoiser, x, sigmas, disable=True)
            exact_dt = ref(denoiser, x, sigmas.double(), disable=True) if dtype == torch.float64 else want
            got = sample_bdia(denoiser, x, sigmas, gamma=0.0, integrator=integrator(), disable=True)
            assert_close_to_rounding(got, exact_dt, 18, float(x.norm()))
    x = noise(sigmas, torch.float32)
    assert torch.equal(karras_euler(denoiser, x, sigmas), sampling.sample_euler(denoiser, x, sigmas, disable=True))
    assert torch.equal(karras_heun(denoiser, x, sigmas), sampling.sample_heun(denoiser, x, sigmas, disable=True))


def test_bdia_over_heun_keeps_heuns_order_with_a_heun_backward_step():
    """BDIA over Heun with its default (Euler) backward step is first order; ``backward=Heun()`` makes the drop-in
    for ``sample_heun`` second order, at one more model call per step."""
    fine_sigmas = karras_sigmas(800)
    errors = {}
    for n in (36, 72):
        sigmas = karras_sigmas(n)
        x = noise(sigmas, torch.float64)
        fine = karras_heun(denoiser, x, fine_sigmas)
        heun = karras_heun(denoiser, x, sigmas)
        first = sample_bdia(denoiser, x, sigmas, integrator=Heun(), disable=True)
        second = sample_bdia(denoiser, x, sigmas, integrator=Heun(), backward=Heun(), disable=True)
        errors[n] = [float((v - fine).norm() / fine.norm()) for v in (heun, first, second)]
        assert errors[n][2] < 1.5 * errors[n][0] < errors[n][1], errors
    ratios = [errors[36][i] / errors[72][i] for i in range(3)]  # halving the step: ~4 for order 2, ~2 for order 1
    assert ratios[0] > 3 and ratios[2] > 3 and ratios[1] < 3, (errors, ratios)
