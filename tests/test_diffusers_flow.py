"""BDIAFlowMatchScheduler against diffusers' FlowMatchEulerDiscreteScheduler as the oracle: the same grid for every
configuration and every way a pipeline sets it, the same pipeline hooks, the scheduler in a loop equal to bdia.sample
to the bit, and clear refusals of what it cannot do."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import bdia  # noqa: E402
from bdia import State  # noqa: E402
from bdia.diffusers import (  # noqa: E402
    BDIAFlowMatchScheduler,
    model_from,
    timesteps_from,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
)
from bdia.report import relative_error as rel  # noqa: E402
from bdia.solvers import BDIA, Euler  # noqa: E402

FlowMatch = diffusers.FlowMatchEulerDiscreteScheduler
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps

# the configurations pipelines run (SD3 / SD3.5, FLUX.1-dev, LTX-style shift_terminal) and every sigma option
CONFIGS = {
    "sd3": dict(shift=3.0),
    "flux": dict(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    ),
    "terminal": dict(shift=2.0, shift_terminal=0.1),
    "karras": dict(shift=3.0, use_karras_sigmas=True),
    "exponential": dict(shift=3.0, use_exponential_sigmas=True),
    "beta": dict(shift=3.0, use_beta_sigmas=True),
    "linear-shift": dict(use_dynamic_shifting=True, time_shift_type="linear"),
    "plain": dict(),
}
# the ways a pipeline calls set_timesteps (retrieve_timesteps): a step count, its own sigmas (Flux), timesteps
CALLS = {
    "n": lambda n: dict(num_inference_steps=n),
    "sigmas": lambda n: dict(sigmas=np.linspace(1.0, 1 / n, n)),  # as FluxPipeline passes them
    "timesteps": lambda n: dict(timesteps=np.linspace(1000.0, 1000.0 / n, n)),
}


def mu_for(config: dict) -> dict:
    return {"mu": 0.83} if config.get("use_dynamic_shifting") else {}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_grid_is_flowmatch_eulers(name, call):
    """timesteps and sigmas are FlowMatchEulerDiscreteScheduler's to the bit, and the walk's float64 grid holds
    exactly those float32 sigmas (terminal 0 included), for every configuration and way of setting them."""
    for n in (1, 4, 28):
        kw = {**CALLS[call](n), **mu_for(CONFIGS[name])}
        ref, ours = FlowMatch(**CONFIGS[name]), BDIAFlowMatchScheduler(**CONFIGS[name])
        ref.set_timesteps(**kw, device="cpu")
        if name == "terminal" and n == 1:  # diffusers stretches one sigma to its terminal by 0 / 0: NaN
            assert ref.sigmas[0].isnan()
            with pytest.raises(ValueError, match="non-finite"):
                ours.set_timesteps(**kw, device="cpu")
            continue
        ours.set_timesteps(**kw, device="cpu")
        assert ours.timesteps.dtype == torch.float32 and torch.equal(ours.timesteps, ref.timesteps)
        assert torch.equal(ours.sigmas, ref.sigmas)
        assert ours.grid(**kw).tolist() == ref.sigmas.double().tolist()
        if call != "timesteps":  # (timesteps_from takes what pipelines pass for a grid: n, sigmas, mu)
            grid = timesteps_from(ref, kw.get("num_inference_steps"), sigmas=kw.get("sigmas"), mu=kw.get("mu"))
            assert grid.tolist() == ref.sigmas.tolist()
        assert ours.num_inference_steps == ref.num_inference_steps


def test_configuration_is_flowmatch_eulers_plus_gamma():
    """Every key of the installed FlowMatchEulerDiscreteScheduler, with its default, and gamma: a config carries
    over whole (a diffusers version with a new key fails here, before a grid could silently differ)."""
    ref = inspect.signature(FlowMatch.__init__).parameters
    ours = inspect.signature(BDIAFlowMatchScheduler.__init__).parameters
    assert set(ours) == set(ref) | {"gamma"}
    assert all(ours[k].default == ref[k].default for k in ref)


@pytest.fixture(scope="module")
def sd3():
    """The tiny SD3 pipeline's transformer and its conditioning for one prompt (the network under test)."""
    pipe = tiny_sd3_pipeline(seed=0)
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    return pipe.transformer, {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def flow_loop(net, scheduler, x, n, cond, **kw):
    """A flow pipeline's loop: the network at each timestep (expanded to the batch), then scheduler.step."""
    scheduler.set_timesteps(n, **kw)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = net(x, timestep=t.expand(x.shape[0]), **cond, return_dict=False)[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def noise(seed: int = 0, shape=(1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["sd3", "flux", "karras"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 0.5])
def test_scheduler_is_bdia_sample_to_the_bit(sd3, name, gamma):
    """The scheduler in a pipeline's loop and bdia.sample over model_from walk the same latents bit for bit: one
    mechanism (BDIA over Euler on the same prediction), and the network sees the scheduler's timesteps to the bit."""
    net, cond = sd3
    n, x, kw = 6, noise(), mu_for(CONFIGS[name])
    sched = BDIAFlowMatchScheduler(**CONFIGS[name], gamma=gamma)
    ours = flow_loop(net, sched, x, n, cond, **kw)
    with torch.no_grad():
        ref = bdia.sample(model_from(net, sched), x, timesteps_from(sched, n, **kw), BDIA(Euler(), gamma), **cond)
    assert torch.equal(ours, ref.x) and torch.equal(sched.state.x_prev, ref.x_prev)
    assert (sched.state.t_prev, sched.state.t) == (ref.t_prev, ref.t) == (sched.grid(n, **kw)[-2].item(), 0.0)


def test_gamma_zero_steps_are_flowmatch_eulers(sd3):
    """Step for step from the same latent and network output, gamma = 0 makes FlowMatchEulerDiscreteScheduler's
    Euler step ``x + h v`` (``h = sigma_next - sigma``) to rounding. Rounding model (u = eps / 2): diffusers rounds
    the product and the sum, ``u (|x| + 2 |h v|)``; bdia rounds the float64 coefficient to float32 and then the
    product and the sum (fused or not), ``u (|x| + 3 |h v|)``: they differ by at most ``eps (|x| + 2.5 |h v|)``."""
    net, cond = sd3
    ref, ours = FlowMatch(**CONFIGS["sd3"]), BDIAFlowMatchScheduler(**CONFIGS["sd3"], gamma=0.0)
    ref.set_timesteps(8), ours.set_timesteps(8)
    x, eps = noise(), torch.finfo(torch.float32).eps
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            out = net(x, timestep=t.expand(1), **cond, return_dict=False)[0]
            a, b = ref.step(out, t, x).prev_sample, ours.step(out, t, x).prev_sample
            h = float(ref.sigmas[i + 1] - ref.sigmas[i])
            assert bool(((a - b).abs() <= eps * (x.abs() + 2.5 * abs(h) * out.abs())).all())
            x = a


def test_pipeline_hooks_match_flowmatch_eulers():
    """What pipelines call besides step: scale_noise (SD3 img2img, with and without set_begin_index),
    index_for_timestep, step_index, set_shift, order, init_noise_sigma, the initial timesteps and sigmas."""
    ref, ours = FlowMatch(shift=3.0), BDIAFlowMatchScheduler(shift=3.0)
    assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
    assert (ours.sigma_min, ours.sigma_max, ours.order, ours.init_noise_sigma) == (ref.sigma_min, ref.sigma_max, 1, 1.0)
    assert len(ours) == 1000 and ours.scale_model_input(noise(), 3.0).equal(noise())
    for s in (ref, ours):
        s.set_timesteps(10)
    x0, eps = noise(1, (2, 4, 8, 8)), noise(2, (2, 4, 8, 8))
    t = ref.timesteps[[3, 7]]
    assert torch.equal(ours.scale_noise(x0, t, eps), ref.scale_noise(x0, t, eps))
    assert ours.index_for_timestep(ref.timesteps[4]) == ref.index_for_timestep(ref.timesteps[4]) == 4
    for s in (ref, ours):
        s.set_begin_index(5)
    start = ref.timesteps[5:6].repeat(2)
    assert torch.equal(ours.scale_noise(x0, start, eps), ref.scale_noise(x0, start, eps))
    assert ours.begin_index == 5 and ours.step_index is None
    ours.step(eps, ours.timesteps[5], x0)
    assert ours.step_index == 6
    for s in (ref, ours):
        s.set_shift(2.0)
        s.set_timesteps(10)
    assert ours.shift == 2.0 and torch.equal(ours.timesteps, ref.timesteps)


def test_save_load_and_from_config(tmp_path, sd3):
    """A pipeline's FlowMatchEulerDiscreteScheduler config carries over with gamma; the scheduler saves and loads."""
    net, cond = sd3
    ref = FlowMatch(**CONFIGS["flux"])
    ours = BDIAFlowMatchScheduler.from_config(ref.config, gamma=0.25)
    assert ours.config.gamma == 0.25 and ours.config.use_dynamic_shifting and ours.config.max_shift == 1.15
    assert any(c.__name__ == "FlowMatchEulerDiscreteScheduler" for c in ours.compatibles)
    ours.save_pretrained(tmp_path)
    back = BDIAFlowMatchScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(back) is BDIAFlowMatchScheduler and public(back.config) == public(ours.config)
    x = noise()
    assert torch.equal(flow_loop(net, back, x, 5, cond, mu=0.7), flow_loop(net, ours, x, 5, cond, mu=0.7))


def test_continues_a_pair_and_refuses_what_it_cannot_do(sd3):
    net, cond = sd3
    sched = BDIAFlowMatchScheduler(shift=3.0)
    sched.set_timesteps(10)
    x = noise()
    out = net(x, timestep=sched.timesteps[:1], **cond, return_dict=False)[0].detach()
    with pytest.raises(ValueError, match="per_token_timesteps"):
        sched.step(out, sched.timesteps[0], x, per_token_timesteps=torch.ones(1, 16))
    with pytest.raises(ValueError, match="s_churn"):
        sched.step(out, sched.timesteps[0], x, s_churn=0.5)
    with pytest.raises(ValueError, match="integer index"):
        sched.step(out, 0, x)
    with pytest.raises(ValueError, match="not on the grid"):
        sched.step(out, torch.tensor(999.0), x)
    first = sched.step(out, sched.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="does not continue the walk"):
        sched.step(out, sched.timesteps[2], first)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        BDIAFlowMatchScheduler(stochastic_sampling=True)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        BDIAFlowMatchScheduler.from_config(FlowMatch(stochastic_sampling=True).config)
    with pytest.raises(ValueError, match="invert_sigmas"):
        BDIAFlowMatchScheduler(invert_sigmas=True)
    with pytest.raises(ValueError, match="gamma must lie in"):
        BDIAFlowMatchScheduler(gamma=2.0)
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        BDIAFlowMatchScheduler.from_config(diffusers.DDIMScheduler().config)
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        BDIAFlowMatchScheduler.from_config({**diffusers.DDIMScheduler().config, "_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="mu"):
        BDIAFlowMatchScheduler(**CONFIGS["flux"]).set_timesteps(10)
    with pytest.raises(ValueError, match="decreasing"):
        BDIAFlowMatchScheduler().set_timesteps(sigmas=[0.5, 0.9, 0.2])
    # a pair from this grid continues where it is; one from another grid is refused
    grid = sched.grid(10).tolist()
    pair = State(x, first, grid[0], grid[1])
    sched.set_timesteps(10, state=pair)
    assert sched.timesteps[0].item() == pytest.approx(1000 * grid[1]) and len(sched.timesteps) == 9
    with pytest.raises(ValueError, match="pair's latent"):
        sched.step(out, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="do not continue this grid"):
        sched.set_timesteps(12, state=pair)


def test_the_flow_scheduler_inside_a_wan_video_pipeline():
    """Beyond the covered image families: Wan (text to video) drives FlowMatchEulerDiscreteScheduler, and the flow
    scheduler drops in. gamma = 0 walks its trajectory to rounding (bound: that walk's own float32 rounding, against
    the float64 pipeline's); at gamma = 1 the scheduler's pair, inverted by bdia.invert over model_from (Wan's
    transformer, guided as its pipeline guides it), returns the video's start noise (bound: that inversion's own
    float32 rounding). (Wan's pipeline makes its latents float32 whatever the transformer's dtype: the walks compared
    are float32 ones.)"""
    n, g = 8, 3.0
    kw = dict(num_inference_steps=n, guidance_scale=g, height=16, width=16, num_frames=5, max_sequence_length=8)
    x = noise(0, (1, 16, 2, 2, 2))  # 16 channels, 2 latent frames of 2x2
    pipes = {dtype: tiny_wan_pipeline(seed=0, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    config = pipes[torch.float32].scheduler.config
    walks = {}
    for label, dtype, scheduler in (
        ("ref", torch.float32, FlowMatch.from_config(config)),
        ("ref", torch.float64, FlowMatch.from_config(config)),
        ("gamma0", torch.float32, BDIAFlowMatchScheduler.from_config(config, gamma=0.0)),
        ("gamma1", torch.float32, BDIAFlowMatchScheduler.from_config(config, gamma=1.0)),
    ):
        pipes[dtype].scheduler = scheduler
        walks[label, dtype] = pipes[dtype]("a cat", latents=x, output_type="latent", **kw).frames
    rounding = max(rel(walks["ref", torch.float32], walks["ref", torch.float64]), n * EPS32)
    assert rel(walks["gamma0", torch.float32], walks["ref", torch.float32]) < 4 * rounding
    pipe = pipes[torch.float32]
    pair, ts = pipe.scheduler.state, timesteps_from(pipe.scheduler, n)

    def inverted(dtype: torch.dtype) -> torch.Tensor:
        p = pipes[dtype]
        embeds, negative = p.encode_prompt("a cat", do_classifier_free_guidance=True, max_sequence_length=8)
        model = model_from(p.transformer, pipe.scheduler, guidance_scale=g, encoder_hidden_states=negative)
        with torch.no_grad():
            return bdia.invert(model, pair.to(dtype), ts, BDIA(Euler(), 1.0), encoder_hidden_states=embeds).x

    z = inverted(torch.float32)
    e = max(rel(z, inverted(torch.float64)), n * EPS32)
    assert rel(z, x) < 4 * e


@pytest.mark.parametrize("cls", [BDIAFlowMatchScheduler, "BDIAScheduler"])
def test_a_pipeline_loop_reads_no_value_back_to_the_host(monkeypatch, cls):
    """A pipeline loops ``for t in scheduler.timesteps`` and passes each ``t`` to ``step``: the scheduler locates
    it by where it lies in ``timesteps`` (it is a view into it), never by reading its value, so a loop on an
    accelerator does not wait on the device at every step (checked here by making any read of a tensor's value
    fail). A timestep given as another tensor is still found by value."""
    from bdia.diffusers import BDIAScheduler

    sched = BDIAScheduler(gamma=1.0) if cls == "BDIAScheduler" else cls(shift=3.0, gamma=1.0)
    x, out = noise(0), noise(1)
    sched.set_timesteps(6)
    reference = x
    for t in sched.timesteps.tolist():  # by value: python numbers
        reference = sched.step(out, torch.tensor(t, dtype=sched.timesteps.dtype), reference).prev_sample
    sched.set_timesteps(6)

    def no_read(*args, **kwargs):
        raise AssertionError("a tensor's value was read back to the host during the loop")

    y = x
    with monkeypatch.context() as m:
        for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
            m.setattr(torch.Tensor, name, no_read)
        for t in sched.timesteps:
            y = sched.step(out, t, y).prev_sample
    assert torch.equal(y, reference)
