"""bdia.diffusers without a pipeline: the adapters against diffusers' schedulers (oracles), the BDIA schedulers
against DDIMScheduler (gamma = 0) and against bdia.sample (any gamma), inversion through the inverse scheduler,
save/load, and the errors. Tiny random networks are built from configs here; nothing is downloaded."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bdia.report import relative_error

diffusers = pytest.importorskip("diffusers")

import bdia  # noqa: E402
from bdia import State  # noqa: E402
from bdia.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    model_from,
    schedule_from,
    timesteps_from,
)
from bdia.schedules import DiscreteVP, Flow  # noqa: E402
from bdia.solvers import BDIA, DDIM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def unet2d(seed: int = 0, dtype: torch.dtype = torch.float32):
    """An unconditional UNet2DModel with self-attention, 3x8x8 samples."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return torch.nn.Module.to(unet, dtype).eval()


@pytest.fixture(scope="module")
def unet():
    return unet2d()


def noise_like(shape=(2, 3, 8, 8), seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def diffusers_loop(unet, scheduler, x: torch.Tensor, n: int, extent: Extent | None = None, **kw) -> torch.Tensor:
    """A pipeline's denoising loop: the network at each of scheduler.timesteps, then scheduler.step."""
    scheduler.set_timesteps(n)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t, **kw)
            x = scheduler.step(out.sample if hasattr(out, "sample") else out, t, x).prev_sample
            if extent is not None and scheduler.state is not None:
                extent(scheduler.state)
    return x


class Extent:
    """A callback that records the largest ``|x| / alpha(t)`` of the latents a walk meets.

    A round trip's rounding lives in the scaled coordinates ``xbar = x / alpha``, where a gamma = 1 walk neither
    grows nor damps it (docs/theory.md): each step adds a few ulps of ``|xbar|``, and an error at the end of the
    walk is ``alpha(t_end)`` times its ``xbar`` error. Classifier-free guidance ``u + g (c - u)`` multiplies the
    network's rounding (and its Jacobian, through which earlier errors pass) by up to ``|1 - g| + |g|``.
    ``bound`` allows 10 such ulps per step; approximate (DDIM-style) inversion misses it by orders of magnitude.
    """

    def __init__(self, schedule):
        self.schedule, self.value = schedule, 0.0

    def __call__(self, step) -> None:
        state = getattr(step, "state", step)  # a bdia callback Step, or a State
        for x, t in ((state.x_prev, state.t_prev), (state.x, state.t)):
            self.value = max(self.value, float(x.abs().max()) / self.schedule.at(t).alpha)

    def bound(self, n: int, dtype: torch.dtype, t_end: float, guidance_scale: float = 1.0) -> float:
        g = guidance_scale if guidance_scale > 1 else 1.0  # (the pipelines' rule: no guidance up to 1)
        ulps = 10 * n * (abs(1 - g) + abs(g))
        return ulps * torch.finfo(dtype).eps * self.schedule.at(t_end).alpha * self.value


rel = relative_error


def test_import_bdia_leaves_diffusers_alone():
    code = "import sys, bdia; assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


# ----------------------------------------------------------------------------------------------- adapters

TABLES = {
    "DDIMScheduler": dict(**SD),
    "DDIMInverseScheduler": dict(beta_schedule="squaredcos_cap_v2"),
    "DDPMScheduler": dict(beta_schedule="linear"),
    "PNDMScheduler": dict(**SD),
    "EulerDiscreteScheduler": dict(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "DPMSolverMultistepScheduler": dict(**SD, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("name", sorted(TABLES))
def test_schedule_from_is_the_schedulers_table(name):
    s = getattr(diffusers, name)(**TABLES[name])
    schedule = schedule_from(s)
    assert isinstance(schedule, DiscreteVP)
    assert torch.equal(schedule.alphas_cumprod, s.alphas_cumprod.double())
    assert schedule.at(-1.0).alpha == 1.0 and schedule.at(-1.0).sigma == 0.0
    for t in (0, 1, 500, 999):
        abar = float(s.alphas_cumprod[t])
        k = schedule.at(float(t))
        assert math.isclose(k.alpha, math.sqrt(abar), rel_tol=1e-15) and math.isclose(k.sigma, math.sqrt(1 - abar))


def test_schedule_from_flow_and_refusals():
    assert isinstance(schedule_from(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)), Flow)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        schedule_from(diffusers.EDMEulerScheduler())
    with pytest.raises(ValueError, match="flow"):
        schedule_from(diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"))


DDIM_LIKE = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DDIMInverseScheduler"]


@pytest.mark.parametrize("name", DDIM_LIKE)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_from_ddim_like_schedulers(name, spacing):
    """The grid a DDIM-like scheduler walks, read off the scheduler, is the core's mirror of DDIM's spacings
    (DiscreteVP.timesteps) and BDIAScheduler's, for every spacing, offset and end point."""
    if name == "DDIMInverseScheduler" and spacing == "linspace":
        pytest.skip("DDIMInverseScheduler has no linspace spacing")
    for offset in (0, 1):
        for one in (False, True):
            cfg = dict(**SD, timestep_spacing=spacing, steps_offset=offset)
            if name != "DDPMScheduler":  # DDPM's last step always goes to alpha = 1
                cfg["set_alpha_to_one"] = one
            if name == "PNDMScheduler":
                cfg["skip_prk_steps"] = True  # Stable Diffusion's: PRK's warm-up adds half steps
            s = getattr(diffusers, name)(**cfg)
            for n in (1, 7, 10, 50, 61):
                grid = timesteps_from(s, n)
                ends_at_one = one or name == "DDPMScheduler"
                if len(grid) < 2:  # one step from t = 0 to abar[0], the identity: the core refuses such a grid
                    with pytest.raises(ValueError, match="single time"):
                        DiscreteVP(s.alphas_cumprod.double()).timesteps(
                            n, spacing, steps_offset=offset, set_alpha_to_one=ends_at_one
                        )
                    continue
                mirror = DiscreteVP(s.alphas_cumprod.double()).timesteps(
                    n, spacing, steps_offset=offset, set_alpha_to_one=ends_at_one
                )
                assert grid.dtype == torch.float64 and torch.equal(grid, mirror), (cfg, n)
                assert torch.equal(BDIAScheduler.from_config(s.config).grid(n), grid)
                s.set_timesteps(n)
                walked = sorted({t for t in s.timesteps.tolist() if t >= 0}, reverse=True)
                assert grid.tolist()[: len(walked)] == walked
                assert grid[-1] == (-1.0 if ends_at_one else 0.0)


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_from_sigma_schedulers(name, spacing):
    """Schedulers with their own spacings (Euler's fractional linspace, DPM-Solver's n + 1 points): their timesteps,
    then the end their final sigma gives (0: alpha = 1, t = -1; sigma_min: abar[0], t = 0)."""
    for final in ("zero", "sigma_min"):
        if name == "EulerDiscreteScheduler" and final == "sigma_min":
            continue
        extra = {} if name == "EulerDiscreteScheduler" else {"final_sigmas_type": final}
        s = getattr(diffusers, name)(**SD, timestep_spacing=spacing, steps_offset=1, **extra)
        for n in (5, 20):
            grid = timesteps_from(s, n)
            s.set_timesteps(n)
            assert grid[:-1].tolist() == s.timesteps.double().tolist()
            assert grid[-1] == (-1.0 if final == "zero" else 0.0)


def test_timesteps_from_flow_and_dynamic_shifting():
    s = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = timesteps_from(s, 12)
    s.set_timesteps(12)
    assert torch.equal(grid, s.sigmas.double()) and grid[-1] == 0.0
    assert torch.equal((grid[:-1] * 1000).float(), s.timesteps)  # what the network is given
    dyn = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu="):
        timesteps_from(dyn, 12)
    dyn.set_timesteps(12, mu=0.8)
    assert torch.equal(timesteps_from(dyn, 12, mu=0.8), dyn.sigmas.double())
    with pytest.raises(ValueError, match="mu"):
        timesteps_from(s, 12, mu=0.8)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("x0", ["plain", "clip_sample", "thresholding"])
def test_model_from_against_ddim_step(unet, prediction, x0):
    """One DDIM step through model_from equals DDIMScheduler.step given the same network output: the prediction
    type and x0's clipping / dynamic thresholding mean what they mean in diffusers."""
    cfg = dict(**SD, prediction_type=prediction, clip_sample=x0 == "clip_sample", thresholding=x0 == "thresholding")
    cfg.update(clip_sample_range=0.5, sample_max_value=1.5, dynamic_thresholding_ratio=0.9)
    ddim = diffusers.DDIMScheduler(**cfg)
    ddim.set_timesteps(20)
    model = model_from(unet, ddim)
    x, t = noise_like(), ddim.timesteps[3]
    with torch.no_grad():
        ref = ddim.step(unet(x, t).sample, t, x)
        pred = model(x, float(t))
        ours = DDIM()(model, x, float(t), float(t) - 50, pred)
    assert torch.allclose(
        pred.x0, ref.pred_original_sample, rtol=1e-5, atol=1e-5 * ref.pred_original_sample.abs().max()
    )
    assert rel(ours, ref.prev_sample) < 1e-6
    if x0 != "plain":  # the processing is active on this input
        assert pred.x0.abs().max() <= (0.5 if x0 == "clip_sample" else 1.0) + 1e-6


def test_model_from_conditional_unet_passes_conditioning_and_1d_timesteps():
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time",  # SDXL's added conditioning
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    ).eval()
    seen = []
    net.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("timestep")), with_kwargs=True)
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False)
    x = noise_like((2, 4, 8, 8))
    cond = {
        "encoder_hidden_states": torch.randn(2, 5, 16),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 8), "time_ids": torch.randn(2, 6)},
    }
    with torch.no_grad():
        eps = model_from(net, sched)(x, 801.0, **cond).eps
        ref = net(x, 801, **cond).sample
    assert torch.equal(eps, ref)
    assert seen[0].shape == (2,) and seen[0].tolist() == [801.0, 801.0]
    # guided: SDXL's dict of added conditioning is batched entry by entry with its unconditional counterpart
    uncond = {
        "encoder_hidden_states": torch.zeros(1, 5, 16),
        "added_cond_kwargs": {"text_embeds": torch.zeros(1, 8), "time_ids": torch.randn(1, 6)},
    }
    with torch.no_grad():
        guided = model_from(net, sched, guidance_scale=3.0, **uncond)(x, 801.0, **cond).eps
        u = net(
            x,
            801,
            encoder_hidden_states=uncond["encoder_hidden_states"].expand(2, -1, -1),
            added_cond_kwargs={k: v.expand(2, -1) for k, v in uncond["added_cond_kwargs"].items()},
        ).sample
    batches = []
    net.register_forward_pre_hook(
        lambda m, args, kw: batches.append((args[0] if args else kw["sample"]).shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        model_from(net, sched, guidance_scale=3.0, **uncond)(x, 801.0, **cond)
    assert batches == [4]  # one batched call for both halves
    torch.testing.assert_close(guided, u + 3.0 * (ref - u), rtol=1e-5, atol=1e-5)


def test_model_from_sd3_transformer_is_flow_matching_euler():
    """An SD3-style transformer under FlowMatchEulerDiscreteScheduler: bdia's DDIM (which is Euler for rectified
    flow) through model_from walks the scheduler's own trajectory."""
    torch.manual_seed(0)
    net = diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 16), "pooled_projections": torch.randn(2, 8)}
    noise, n = noise_like((2, 4, 8, 8)), 8
    sched.set_timesteps(n)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x, timestep=t.expand(2), **cond).sample, t, x).prev_sample
        ours = bdia.sample(model_from(net, sched), noise, timesteps_from(sched, n), BDIA(DDIM(), 0.0), **cond).x
    assert rel(ours, x) < 1e-6


# ---------------------------------------------------------------------------------------------- schedulers

CONFIGS = {
    "sd": dict(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
    "ddim-defaults": dict(),  # linear betas, clip_sample=True, leading, alpha = 1 at the end
    "v-zsnr-trailing": dict(
        **SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"
    ),
    "sample-thresholding": dict(prediction_type="sample", thresholding=True, sample_max_value=2.0),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_gamma_zero_is_ddimscheduler(config):
    """gamma = 0 walks DDIMScheduler's trajectory to rounding, not to the bit: bdia folds each step into float64
    coefficients of (x, network output) applied in one fused combination, diffusers computes x0 first and
    recombines in the latent's dtype (and rounds its coefficients' square roots in float32).

    Tolerance model: "to rounding" is measured on this very walk. DDIMScheduler's own float32 walk against its
    float64 walk (the same weights and noise) gives ``e``, the rounding of N float32 steps as this network and
    grid carry it forward (its growth included, whatever the machine's roundings). Both implementations round each
    step by a few ulps, so in float32 they differ by at most a few ``e``; in float64 they differ only through
    diffusers' float32 coefficients (a few ulps of float32 per step, carried by the same growth), which is again
    at most a few ``e``. A floor of N ulps covers a walk whose rounding happens to cancel. A wrong coefficient or
    timestep misses both bounds by orders of magnitude."""
    n, eps = 10, torch.finfo(torch.float32).eps
    walks = {}
    for dtype in (torch.float32, torch.float64):
        net, x = unet2d(dtype=dtype), noise_like().to(dtype)
        walks[dtype] = [
            diffusers_loop(net, scheduler, x, n).double()
            for scheduler in (diffusers.DDIMScheduler(**CONFIGS[config]), BDIAScheduler(**CONFIGS[config], gamma=0.0))
        ]
    (ddim32, ours32), (ddim64, ours64) = walks[torch.float32], walks[torch.float64]
    rounding = max(rel(ddim32, ddim64), n * eps)
    assert rel(ours64, ddim64) < 4 * rounding
    assert rel(ours32, ddim32) < 4 * rounding


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_scheduler_is_bdia_sample_to_the_bit(unet, config, gamma):
    """The scheduler in a pipeline's loop and bdia.sample over model_from make the same latents, bit for bit: one
    mechanism (BDIA.init/step on the same Prediction), and the network sees the same timesteps."""
    n, x = 10, noise_like()
    sched = BDIAScheduler(**CONFIGS[config], gamma=gamma)
    ours = diffusers_loop(unet, sched, x, n)
    with torch.no_grad():
        ref = bdia.sample(model_from(unet, sched), x, timesteps_from(sched, n), BDIA(DDIM(), gamma))
    assert torch.equal(ours, ref.x) and torch.equal(sched.state.x_prev, ref.x_prev)
    assert (sched.state.t_prev, sched.state.t) == (ref.t_prev, ref.t)


def test_linspace_steps_to_the_grids_next_timestep():
    """With linspace spacing the timesteps are not uniformly spaced: DDIMScheduler steps to t - T // n (off the
    grid), BDIAScheduler to the next grid timestep (where its next step starts)."""
    n, cfg = 50, dict(**SD, clip_sample=False, timestep_spacing="linspace")
    ddim, ours = diffusers.DDIMScheduler(**cfg), BDIAScheduler(**cfg, gamma=0.0)
    ddim.set_timesteps(n), ours.set_timesteps(n)
    ts = ours.timesteps.tolist()
    assert ts == ddim.timesteps.tolist()
    i = next(i for i in range(n - 1) if ts[i] - ts[i + 1] != 1000 // n)  # (999 / 49 = 20.4 apart on average)
    t, t_grid, t_ddim = ts[i], ts[i + 1], ts[i] - 1000 // n
    x = noise_like(dtype=torch.float64)
    with torch.no_grad():
        out = unet2d(dtype=torch.float64)(x, t).sample
    abar = ours.alphas_cumprod.double()
    x0 = (x - (1 - abar[t]).sqrt() * out) / abar[t].sqrt()

    def ddim_to(s: int) -> torch.Tensor:
        return abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * out

    assert rel(ours.step(out, t, x).prev_sample, ddim_to(t_grid)) < 1e-14
    assert rel(ddim.step(out, t, x).prev_sample, ddim_to(t_ddim)) < 1e-6  # (diffusers rounds abar in float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("config", ["sd", "ddim-defaults", "sample-thresholding"])
def test_inverse_scheduler_round_trip(config, dtype):
    """Noise -> BDIAScheduler -> BDIAInverseScheduler from the pair: the noise again, to rounding, with clipping and
    thresholding active as configured; the inverse scheduler is bdia.invert to the bit."""
    net, n = unet2d(dtype=dtype), 20
    x = noise_like(dtype=dtype)
    sched = BDIAScheduler(**CONFIGS[config], gamma=1.0)
    extent = Extent(sched.schedule)
    diffusers_loop(net, sched, x, n, extent)
    inv = BDIAInverseScheduler.from_config(sched.config)
    inv.set_timesteps(n, state=sched.state)
    assert inv.timesteps.tolist() == sched.timesteps.tolist()[::-1][:-1]  # the model at t_{N-1}, ..., t_1
    z = sched.state.x_prev  # the pair's point at inv.timesteps[0]
    with torch.no_grad():
        for t in inv.timesteps:
            z = inv.step(net(z, t).sample, t, z).prev_sample
        ref = bdia.invert(model_from(net, sched), sched.state, timesteps_from(sched, n), BDIA(DDIM(), 1.0))
    assert torch.equal(z, ref.x) and torch.equal(inv.state.x, ref.x) and torch.equal(inv.state.x_prev, ref.x_prev)
    assert float((z - x).abs().max()) < extent.bound(n, dtype, inv.state.t)


def test_inverse_scheduler_from_data_then_back(unet):
    """A lone latent: one plain DDIM step, then exact steps; sampling from the inverted pair rebuilds it."""
    n, data = 20, noise_like(seed=5) * 0.5
    inv = BDIAInverseScheduler(**CONFIGS["sd"])
    inv.set_timesteps(n)
    assert inv.timesteps[0] == 0 and inv.timesteps[-1] == inv.grid(n)[1]
    z, extent = data, Extent(inv.schedule)
    with torch.no_grad():
        for t in inv.timesteps:
            z = inv.step(unet(z, t).sample, t, z).prev_sample
            extent(inv.state)
    sched = BDIAScheduler.from_config(inv.config)
    sched.set_timesteps(n, state=inv.state)
    assert sched.timesteps.tolist() == inv.timesteps.tolist()[::-1][:-1]  # the model at t_1, ..., t_{N-1}
    x = inv.state.x_prev  # the pair's point at sched.timesteps[0]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert float((x - data).abs().max()) < extent.bound(n, torch.float32, 0.0)
    # the bound tells exact from approximate: DDIM inversion and DDIM sampling miss it by orders of magnitude
    with torch.no_grad():
        model, grid = model_from(unet, sched), sched.grid(n)
        ddim = bdia.sample(model, bdia.invert(model, data, grid, DDIM()).x, grid, DDIM()).x
    assert float((ddim - data).abs().max()) > 1e3 * extent.bound(n, torch.float32, 0.0)


def test_save_load_and_from_config(tmp_path, unet):
    sched = BDIAScheduler(**CONFIGS["v-zsnr-trailing"], gamma=0.7)
    sched.save_pretrained(tmp_path)
    back = BDIAScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert type(back) is BDIAScheduler and public(back.config) == public(sched.config) and back.config.gamma == 0.7
    x = noise_like()
    assert torch.equal(diffusers_loop(unet, back, x, 6), diffusers_loop(unet, sched, x, 6))
    # configs of DDIM-like schedulers carry over with their meaning; BDIA's compatibles list them
    for name in ("PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler"):
        other = getattr(diffusers, name)(**SD, steps_offset=1, timestep_spacing="trailing")
        ours = BDIAScheduler.from_config(other.config, gamma=0.5)
        assert (ours.config.steps_offset, ours.config.timestep_spacing, ours.config.gamma) == (1, "trailing", 0.5)
        assert torch.equal(ours.alphas_cumprod, other.alphas_cumprod)
        assert any(c.__name__ == name for c in ours.compatibles)
    assert type(BDIAInverseScheduler.from_config(sched.config)) is BDIAInverseScheduler


def test_timesteps_equal_ddimschedulers_for_every_n():
    """Every n from 1 to T, every spacing and offset: DDIMScheduler's timesteps, except where numpy's arange
    overshoots in trailing spacing and DDIMScheduler appends timestep -1 (n + 1 steps, the last indexing
    alphas_cumprod[-1], the noisiest entry): there BDIAScheduler walks the n intended steps."""
    overshoots = 0
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
            ours = BDIAScheduler(timestep_spacing=spacing, steps_offset=offset)
            for n in range(1, 1001 - offset * (spacing == "leading")):
                ddim.set_timesteps(n), ours.set_timesteps(n)
                if spacing == "trailing" and len(ddim.timesteps) == n + 1:
                    assert ddim.timesteps[-1] == -1 and torch.equal(ddim.timesteps[:-1], ours.timesteps)
                    overshoots += 1
                else:
                    assert torch.equal(ddim.timesteps, ours.timesteps), (spacing, offset, n)
    assert overshoots > 0
    with pytest.raises(ValueError, match="outside"):  # DDIMScheduler would make timestep 1000
        BDIAScheduler(steps_offset=1).set_timesteps(1000)


def test_add_noise_and_pipeline_hooks():
    sched = BDIAScheduler(**CONFIGS["sd"])
    ddim = diffusers.DDIMScheduler(**CONFIGS["sd"])
    x0, eps, t = noise_like(seed=2), noise_like(seed=3), torch.tensor([981, 1])
    assert rel(sched.add_noise(x0, eps, t), ddim.add_noise(x0, eps, t)) < 1e-6
    assert sched.scale_model_input(x0, 981) is x0 and sched.init_noise_sigma == 1.0 and sched.order == 1
    assert len(sched) == 1000
    sched.set_timesteps(5, device="cpu")
    assert sched.timesteps.dtype == torch.int64 and sched.state is None


def test_errors(unet):
    sched = BDIAScheduler(**CONFIGS["sd"])
    x = noise_like()
    out = unet(x, 981).sample.detach()
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(out, 981, x)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="eta must be 0"):
        sched.step(out, 901, x, eta=0.5)
    with pytest.raises(ValueError, match="not on the grid"):
        sched.step(out, 900, x)
    sched.step(out, 901, x)
    with pytest.raises(ValueError, match="does not continue the walk"):
        sched.step(out, 701, x)
    with pytest.raises(ValueError, match="shaped like x"):
        sched.step(out[:1], 801, x)
    with pytest.raises(ValueError, match="gamma must lie in"):
        BDIAScheduler(gamma=1.5)
    with pytest.raises(ValueError, match="prediction_type"):
        BDIAScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="timestep_spacing"):
        BDIAScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="beta_schedule"):
        BDIAScheduler(beta_schedule="cosine")
    flow = diffusers.FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="DDIM-like"):
        BDIAScheduler.from_config(flow.config)
    with pytest.raises(ValueError, match="DDIM-like"):
        BDIAScheduler.from_config(diffusers.EDMEulerScheduler().config)
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler's"):  # as saved: named
        BDIAScheduler.from_config({**flow.config, "_class_name": "FlowMatchEulerDiscreteScheduler"})
    legacy = {**diffusers.PNDMScheduler(**SD).config, "_class_name": "PNDMScheduler", "tensor_format": "pt"}
    assert BDIAScheduler.from_config(legacy).config.beta_end == 0.012  # a saved config's old keys are ignored
    karras = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        BDIAScheduler.from_config(karras.config)
    assert BDIAScheduler.from_config(karras.config, use_karras_sigmas=False).config.beta_end == 0.012
    # a pair from another grid, or the wrong latent of a right pair
    pair = State(noise_like(seed=4), x, 901.0, 801.0)
    with pytest.raises(ValueError, match="do not continue this grid"):
        sched.set_timesteps(20, state=pair)
    sched.set_timesteps(10, state=pair)
    with pytest.raises(ValueError, match="pair's latent"):
        sched.step(out, 801, pair.x_prev)
    inv = BDIAInverseScheduler(**CONFIGS["sd"], gamma=0.0)
    with pytest.raises(ValueError, match="gamma = 0"):
        inv.set_timesteps(10)
    inv = BDIAInverseScheduler(**CONFIGS["sd"])
    inv.set_timesteps(10, state=State(pair.x_prev, pair.x, 801.0, 701.0))
    assert inv.timesteps.tolist() == [801]  # the walk goes on from the pair's noisier point to 901, the last
    z = inv.step(out, 801, pair.x_prev).prev_sample
    with pytest.raises(ValueError, match="noisiest"):
        inv.step(out, 901, z)


def test_the_package_keeps_the_modules_names():
    """bdia.diffusers became a package (adapters, schedulers, pipelines, tiny): every public name of the module it
    was stays importable from it, and each lives in the submodule of its concept."""
    import bdia.diffusers as package

    was = ["BDIAInverseScheduler", "BDIAScheduler", "BDIASchedulerOutput", "invert", "model_from", "sample"]
    was += ["schedule_from", "timesteps_from", "tiny_pipeline"]
    assert all(hasattr(package, name) for name in was) and set(was) <= set(package.__all__)
    homes = {"adapters": "model_from", "schedulers": "BDIAScheduler", "pipelines": "invert", "tiny": "tiny_pipeline"}
    for module, name in homes.items():
        assert getattr(package, name).__module__ == f"bdia.diffusers.{module}"
