"""Oracles: schedules, grids and DDIM steps against diffusers; Heun against EDM's Algorithm 1 written here from the
paper; BDIA with gamma = 0 against the plain integrators; a BDIA-DDIM step derived by hand (the gamma convention);
Euler against DDIM where the two must coincide.

Float32 rounding bounds use ``u = 2^-24`` (float32's unit roundoff): each rounded operation changes a result of
magnitude ``m`` by at most ``u m``. A bound below counts the operations on each path and says so.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import bdia
from bdia.models import CountNFE, GaussianMixture, Model, Prediction
from bdia.schedules import EDM, DiscreteVP, Flow
from bdia.solvers import BDIA, DDIM, Euler, Heun
from bdia.state import State

U32 = 2.0**-24
T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
BETAS = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": {},
}


@pytest.fixture(scope="module")
def diffusers():
    return pytest.importorskip("diffusers")


class TanhNet:
    """A small deterministic network: ``tanh(x W + b + c sin(t / 100))`` (a fixed random map; output ~ unit scale)."""

    def __init__(self, dim: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.b = torch.randn(dim, generator=g, dtype=torch.float64)
        self.c = torch.randn(dim, generator=g, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        W, b, c = (v.to(x.dtype) for v in (self.W, self.b, self.c))
        return torch.tanh(x @ W + b + torch.sin(t.to(x.dtype)[:, None] / 100) * c)


# ---------------------------------------------------------------------------------------------------------------
# schedules and grids against diffusers


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kind", list(BETAS))
def test_alphas_cumprod_match_diffusers(diffusers, kind, rescale):
    """diffusers computes betas and their cumulative product in float32, we in float64.

    Bound on alpha_k = sqrt(abar_k): each of the k + 1 float32 factors of the cumulative product carries at most
    three roundings (beta, 1 - beta, the product), so abar_k is off by at most 3u(k+1) relatively and its square root
    by half that; the zero-terminal-SNR rescaling (sqrt, shift, scale, square, ratio, 1 - ., 1 - ., a second
    cumulative product) at most doubles the count. So |alpha - alpha_diffusers| <= 4u(k+1) (alpha <= 1).
    An off-by-one index moves alpha_0 by beta_0/2 >= 5e-5, 200 times the bound there.
    """
    sched = diffusers.DDIMScheduler(beta_schedule=kind, rescale_betas_zero_snr=rescale, **BETAS[kind])
    ours = DiscreteVP.from_betas(kind, rescale_zero_terminal_snr=rescale, **BETAS[kind]).alphas_cumprod
    theirs = sched.alphas_cumprod.to(torch.float64)
    assert theirs.shape == ours.shape == (T,)
    bound = 4 * U32 * torch.arange(1, T + 1, dtype=torch.float64)
    err = (ours.sqrt() - theirs.sqrt()).abs()
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3g} at k={int(err.argmax())}"
    if rescale:
        assert ours[-1] == 0 and theirs[-1] == 0


def _diffusers_extra_step(sched, n: int) -> bool:
    # numpy's arange(T, 0, -T/n) overshoots for some n (968, 970, ...): diffusers then has n + 1 trailing
    # timesteps, the last being -1 (which indexes abar[-1], pure noise). We keep n steps; those n are skipped.
    sched.set_timesteps(n)
    return len(sched.timesteps) != n


@pytest.mark.parametrize(
    "spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("n", [1, 2, 7, 10, 25, 33, 48, 50, 51, 100, 333, 999, 1000])
def test_timesteps_match_diffusers(diffusers, spacing, offset, n):
    """Our grid is diffusers' timesteps plus the end point (abar[0] at t = 0, or alpha = 1 at t = -1), the end
    point merged when diffusers' last timestep already is it. n = 48 (trailing) has ties at .5 that only
    numpy's accumulated arange values break the way diffusers does."""
    if (spacing == "leading" and (n - 1) * (T // n) + offset > T - 1) or (spacing == "linspace" and n == 1):
        pytest.skip("diffusers' own grid leaves [0, T-1] (or divides by zero) here")
    sched = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    if _diffusers_extra_step(sched, n):
        pytest.skip("numpy arange overshoot in diffusers (an extra timestep -1)")
    theirs = sched.timesteps.tolist()
    schedule = DiscreteVP.from_betas("linear")
    for end, to_one in ((0, False), (-1, True)):
        expected = [float(t) for t in sorted(set(theirs) | {end}, reverse=True)]
        if len(expected) < 2:  # diffusers' one step from t = 0 to abar[0] is the identity: no grid to walk
            with pytest.raises(ValueError, match="single time"):
                schedule.timesteps(n, spacing, steps_offset=offset, set_alpha_to_one=to_one)
            continue
        ours = schedule.timesteps(n, spacing, steps_offset=offset, set_alpha_to_one=to_one)
        assert ours.dtype == torch.float64
        assert ours.tolist() == expected


# ---------------------------------------------------------------------------------------------------------------
# DDIM sampling and inversion, step by step against diffusers driven by the same model outputs

DDIM_CASES = [
    (pred, spacing, offset, to_one, n)
    for pred in ("epsilon", "v_prediction")
    for spacing, offset in (("leading", 1), ("trailing", 0))
    for to_one in (False, True)
    for n in (10, 50)  # trailing: n divides T, since diffusers' step assumes the uniform stride T // n
]


def _ddim_setup(diffusers, cls, pred, spacing, offset, to_one, n):
    sched = cls(
        **SD, clip_sample=False, set_alpha_to_one=to_one, steps_offset=offset, timestep_spacing=spacing,
        prediction_type=pred,
    )  # fmt: skip
    sched.set_timesteps(n)
    # the same float32 table as diffusers (each float32 is exact in float64): only the step arithmetic differs
    schedule = DiscreteVP(sched.alphas_cumprod.to(torch.float64))
    ts = schedule.timesteps(n, spacing, steps_offset=offset, set_alpha_to_one=to_one)
    net = TanhNet()
    model = Model(net, schedule, "epsilon" if pred == "epsilon" else "v")
    return sched, schedule, ts, net, model


def _step_bound(schedule, pred: str, t: float, s: float, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Elementwise float32 rounding bound for one DDIM step t -> s computed two ways: x_s = A x + B out.

    The magnitudes of the partial terms are at most a |x| + b |out| (a, b: sums of |products| of the
    coefficients); each path rounds about four times (two products, two sums) plus float32 square roots of
    abar in diffusers: 8 u (a |x| + b |out|)."""
    k, ks = schedule.at(t), schedule.at(s)
    if pred == "epsilon":  # x0 = (x - sigma out)/alpha, eps = out
        a, b = ks.alpha / k.alpha, ks.alpha * k.sigma / k.alpha + ks.sigma
    else:  # x0 = alpha x - sigma out, eps = sigma x + alpha out
        a, b = ks.alpha * k.alpha + ks.sigma * k.sigma, ks.alpha * k.sigma + ks.sigma * k.alpha
    return 8 * U32 * (a * x.abs() + b * out.abs())


@pytest.mark.parametrize("pred,spacing,offset,to_one,n", DDIM_CASES)
def test_ddim_trajectory_matches_diffusers(diffusers, pred, spacing, offset, to_one, n):
    sched, schedule, ts, net, model = _ddim_setup(diffusers, diffusers.DDIMScheduler, pred, spacing, offset, to_one, n)
    assert ts[:n].tolist() == [float(t) for t in sched.timesteps.tolist()] and len(ts) == n + 1
    x_T = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    path = [x_T]
    out = bdia.sample(model, x_T, ts, DDIM(), callback=lambda st: path.append(st.state.x))
    assert out.x.dtype == torch.float32 and torch.equal(out.x, path[-1]) and len(path) == n + 1
    for i, t in enumerate(sched.timesteps.tolist()):
        x = path[i]
        model_output = net(x, torch.full((4,), float(t)))  # the output our Model fed its step
        theirs = sched.step(model_output, t, x).prev_sample
        bound = _step_bound(schedule, pred, float(t), float(ts[i + 1]), x, model_output)
        err = (theirs - path[i + 1]).abs()
        assert bool((err <= bound).all()), f"step {i} (t={t}): err/bound {float((err / bound).max()):.3g}"


@pytest.mark.parametrize("pred,spacing,offset,to_one,n", DDIM_CASES)
def test_ddim_inversion_matches_diffusers_inverse_step(diffusers, pred, spacing, offset, to_one, n):
    """DDIM inversion against diffusers' DDIMInverseScheduler, step by step.

    Convention difference: ``DDIMInverseScheduler.step(model_output, timestep, sample)`` moves ``sample`` from
    ``timestep - T // n`` (or its initial alpha when that is negative) to ``timestep`` with whatever output the
    caller passes, and diffusers' inversion pipelines pass the network evaluated at the DESTINATION timestep
    (``unet(latents, t)``). Our ``invert`` with ``DDIM()`` evaluates the model at the START point (the state it
    is at, at its own time), the classic DDIM inversion of Song et al., except from clean data at sigma = 0, where
    it evaluates at the destination as diffusers does. So this test checks the step arithmetic
    by feeding diffusers' inverse step the output we evaluate at our start point; with diffusers' pipeline
    convention the two inversions differ by a model-evaluation-time shift, not by rounding.
    """
    sched, schedule, ts, net, model = _ddim_setup(
        diffusers, diffusers.DDIMInverseScheduler, pred, spacing, offset, to_one, n
    )
    up = ts.flip(0).tolist()  # the inversion walk: end point first
    assert [float(t) for t in sched.timesteps.tolist()] == up[1:]
    x_0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    path = [x_0]
    bdia.invert(model, x_0, ts, DDIM(), callback=lambda st: path.append(st.state.x))
    assert len(path) == n + 1
    for i, t in enumerate(sched.timesteps.tolist()):
        x, start = path[i], up[i]
        # from clean data (alpha = 1, sigma = 0) the first step predicts the noise at its destination: the network
        # is never evaluated at t = -1, where it was not trained
        # (its noise prediction there is what diffusers' step must take as its output at alpha = 1: there, eps = v)
        clean = schedule.at(start).sigma == 0
        model_output = model(x, float(t)).eps if clean else net(x, torch.full((4,), start))
        theirs = sched.step(model_output, t, x).prev_sample
        bound = _step_bound(schedule, pred, start, float(t), x, model_output)
        err = (theirs - path[i + 1]).abs()
        assert bool((err <= bound).all()), f"step {i} (to t={t}): err/bound {float((err / bound).max()):.3g}"


# ---------------------------------------------------------------------------------------------------------------
# Heun against EDM's Algorithm 1 (Karras et al. 2022), written here from the paper


def edm_algorithm_1(D, x: torch.Tensor, sigmas: list[float]) -> list[torch.Tensor]:
    """Karras et al. (2022), Algorithm 1 (deterministic sampling, sigma(t) = t, s(t) = 1), in float64."""
    path = [x]
    for t_i, t_next in itertools.pairwise(sigmas):
        d_i = (x - D(x, t_i)) / t_i  # evaluate dx/dt at t_i
        x_next = x + (t_next - t_i) * d_i  # Euler step from t_i to t_{i+1}
        if t_next != 0:  # apply the 2nd order correction
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_i) * (0.5 * d_i + 0.5 * d_prime)
        x = x_next
        path.append(x)
    return path


@pytest.mark.parametrize("n,rho", [(18, 7.0), (5, 3.0)])
def test_heun_matches_edm_algorithm_1(n, rho):
    s = EDM()
    gmm = GaussianMixture.random(s, dim=4, components=3, std=0.5, seed=3)
    sigmas = s.timesteps(n, rho=rho)
    x = 80.0 * torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want = edm_algorithm_1(lambda z, t: gmm(z, t).x0, x, sigmas.tolist())
    counted = CountNFE(gmm)
    ours = [x]
    bdia.sample(counted, x, sigmas, Heun(), callback=lambda st: ours.append(st.state.x))
    assert counted.calls == 2 * n - 1  # n steps, the last (to sigma = 0) an Euler step
    assert len(ours) == len(want) == n + 1
    for i, (a, b) in enumerate(zip(ours, want, strict=True)):
        # eps from the mixture directly vs (x - D)/t: the same number up to a few ulps of x
        assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max())), f"point {i}"


# ---------------------------------------------------------------------------------------------------------------
# BDIA: gamma = 0, the hand-derived step, the gamma convention


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("integrator", [DDIM, Euler, Heun], ids=lambda c: c.__name__)
def test_bdia_with_gamma_zero_is_the_plain_integrator(integrator, dtype):
    """gamma = 0 zeroes the correction: its coefficients merge into the integrator's own, exactly."""
    for s, ts in (
        (DiscreteVP.from_betas("scaled_linear", **BETAS["scaled_linear"]), None),
        (EDM(), EDM().timesteps(12)),
    ):
        ts = s.timesteps(20, "leading", steps_offset=1) if ts is None else ts
        gmm = GaussianMixture.random(s, dim=8, components=3, std=0.5, seed=7)
        x = torch.randn(5, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
        x = (x * math.hypot(*s.at(float(ts[0]))[:2])).to(dtype)
        plain = bdia.sample(gmm, x, ts, integrator())
        zero = bdia.sample(gmm, x, ts, BDIA(integrator(), gamma=0.0))
        assert torch.equal(plain.x, zero.x) and torch.equal(plain.x_prev, zero.x_prev)


class ConstantDenoiser:
    """Returns the same (x0, eps) wherever it is asked: the step's arithmetic can then be done by hand."""

    def __init__(self, schedule, x0: torch.Tensor, eps: torch.Tensor):
        self.schedule, self.x0, self.eps = schedule, x0, eps

    def __call__(self, x: torch.Tensor, t: float, **_) -> Prediction:
        return Prediction(self.x0.expand_as(x), self.eps.expand_as(x))


def test_bdia_ddim_step_by_hand():
    """Flow schedule (alpha = 1 - t, sigma = t), times t_prev = 0.8, t = 0.5, t_next = 0.25, x0 = 1, eps = 2,
    x_prev = 3, gamma = 1/4. By hand:
        DDIM(x; t -> t_next) = 0.75 * 1 + 0.25 * 2 = 1.25,   DDIM(x; t -> t_prev) = 0.2 * 1 + 0.8 * 2 = 1.8,
        x_next = 1.25 + gamma (3 - 1.8) = 1.25 + 0.3 = 1.55,
    and the inverse: x_prev = 1.8 + (1.55 - 1.25) / gamma = 1.8 + 1.2 = 3.
    The swapped convention (1 - gamma on the correction, an early README's) would give 1.25 + 0.9 = 2.15."""
    one = torch.ones(1, 1, dtype=torch.float64)
    model = ConstantDenoiser(Flow(), one, 2 * one)
    solver = BDIA(DDIM(), gamma=0.25)
    x = 0.7 * one  # any value: the constant denoiser ignores it
    stepped = solver.step(model, State(3 * one, x, 0.8, 0.5), 0.25)
    assert stepped.t_prev == 0.5 and stepped.t == 0.25 and stepped.x_prev is x
    assert abs(float(stepped.x) - 1.55) < 1e-15
    assert abs(float(stepped.x) - 2.15) > 0.5  # the swapped convention fails this test
    back = solver.unstep(model, stepped, 0.8)
    assert back.t_prev == 0.8 and back.t == 0.5
    assert abs(float(back.x_prev) - 3.0) < 1e-15 and torch.equal(back.x, x)


@pytest.mark.parametrize("gamma", [1.0, 0.7, 0.2])
def test_bdia_ddim_step_closed_form(gamma):
    """x_next = alpha_n x0 + sigma_n eps + gamma (x_prev - alpha_p x0 - sigma_p eps), and its inverse, on the SD
    schedule with random x0, eps, x_prev; the swapped convention (1 - gamma) is far from it."""
    s = DiscreteVP.from_betas("scaled_linear", **BETAS["scaled_linear"])
    g = torch.Generator().manual_seed(11)
    x0, eps, x_prev, x = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    model = ConstantDenoiser(s, x0, eps)
    tp, t, tn = 961.0, 941.0, 921.0
    (ap, sp), (an, sn) = s.alpha_sigma(tp), s.alpha_sigma(tn)
    correction = x_prev - ap * x0 - sp * eps
    want = an * x0 + sn * eps + gamma * correction
    swapped = an * x0 + sn * eps + (1 - gamma) * correction
    solver = BDIA(DDIM(), gamma=gamma)
    got = solver.step(model, State(x_prev, x, tp, t), tn).x
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-14 * scale
    if gamma != 0.5:
        assert float((got - swapped).abs().max()) > 1e-3 * scale
    rebuilt = solver.unstep(model, State(x, got, t, tn), tp).x_prev
    by_hand = ap * x0 + sp * eps + (got - an * x0 - sn * eps) / gamma
    assert float((rebuilt - by_hand).abs().max()) <= 1e-14 * scale / gamma
    assert float((rebuilt - x_prev).abs().max()) <= 1e-13 * scale / gamma


# ---------------------------------------------------------------------------------------------------------------
# Euler and DDIM: the same method where alpha' = 0 or alpha + sigma = 1, not on VP


@pytest.mark.parametrize("kind", ["edm", "flow", "vp"])
def test_euler_equals_ddim_on_edm_and_flow_only(kind):
    s, ts = {
        "edm": (EDM(), EDM().timesteps(15)),
        "flow": (Flow(), Flow().timesteps(15, shift=3.0)),
        "vp": (DiscreteVP.from_betas("scaled_linear", **BETAS["scaled_linear"]), None),
    }[kind]
    ts = s.timesteps(15, "leading", steps_offset=1) if ts is None else ts
    gmm = GaussianMixture.random(s, dim=4, components=3, std=0.5, seed=9)
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    x = x * math.hypot(*s.at(float(ts[0]))[:2])
    paths = {}
    for name, solver in (("euler", Euler()), ("ddim", DDIM())):
        paths[name] = []
        bdia.sample(gmm, x, ts, solver, callback=lambda st, p=paths[name]: p.append(st.state.x))
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(paths["euler"], paths["ddim"], strict=True))
    if kind == "vp":
        assert diff > 1e-3  # Euler in native time is a different first-order method there
    else:
        # x0 and eps of the mixture satisfy x = alpha x0 + sigma eps only to rounding, which is all that differs
        assert diff < 1e-12
