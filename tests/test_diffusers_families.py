"""invert / sample / encode / decode through every covered pipeline family, one mechanism: Stable Diffusion 1.5,
SDXL, SD3 and Flux pipelines with tiny random weights, built offline (``bdia.diffusers.tiny``).

Per family: the one-line scheduler swap, gamma = 0 on the pipeline's own walk (DDIMScheduler's,
FlowMatchEulerDiscreteScheduler's), an image inverted and resampled against ``encode(pipe, image)`` in float32 and
float64, a pipeline-made sample's pair inverted back to its noise, an edit under a new prompt, strength, and
``sample`` drawing the pipeline's own noise from a generator.

Tolerance model ("to rounding", measured on the walk itself, never a constant tuned on one machine): a walk's
float32 result against its float64 result from the same start (the same weights, cast) is the rounding of N float32
steps as this network and grid carry it forward, growth included: ``rounding``. Two float32 implementations of the
same walk, or a round trip whose errors pass through that walk, differ by a few of it; in float64 the same growth
carries float64 roundings, ``rounding * eps64 / eps32`` (errors this small propagate linearly). A floor of N ulps
covers a walk whose roundings happen to cancel. Approximate (Euler / DDIM) inversion misses the bound by orders of
magnitude.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from bdia import State  # noqa: E402
from bdia.diffusers import (  # noqa: E402
    BDIAFlowMatchScheduler,
    BDIAScheduler,
    decode,
    encode,
    invert,
    sample,
    timesteps_from,
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
)
from bdia.report import relative_error as rel  # noqa: E402
from bdia.solvers import BDIA, DDIM, Euler, identity  # noqa: E402

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
N = 10  # steps of every walk here
PROMPTS = ["a cat", "a dog"]


@dataclass(frozen=True)
class Case:
    build: Any  # the tiny pipeline
    options: dict  # the pipeline keywords every call passes (the tiny T5's sequence length)
    reference: Any  # the pipeline's own deterministic scheduler, which gamma = 0 must walk
    ours: Any  # the BDIA scheduler that swaps in
    guidance: dict  # a guidance setting its pipeline uses
    approximate: Any  # the approximate inversion users run today


CASES = {
    "sd15": Case(tiny_pipeline, {}, diffusers.DDIMScheduler, BDIAScheduler, {"guidance_scale": 3.0}, DDIM()),
    "sdxl": Case(tiny_sdxl_pipeline, {}, diffusers.DDIMScheduler, BDIAScheduler, {"guidance_scale": 3.0}, DDIM()),
    "sd3": Case(
        tiny_sd3_pipeline,
        {"max_sequence_length": 8},
        diffusers.FlowMatchEulerDiscreteScheduler,
        BDIAFlowMatchScheduler,
        {"guidance_scale": 3.0},
        Euler(),
    ),
    "flux": Case(
        tiny_flux_pipeline,
        {"max_sequence_length": 8},
        diffusers.FlowMatchEulerDiscreteScheduler,
        BDIAFlowMatchScheduler,
        {"guidance_scale": 3.5},  # the distilled guidance embedding
        Euler(),
    ),
}
FAMILIES = sorted(CASES)


@functools.cache
def _pipe(name: str, dtype: torch.dtype) -> Any:
    return CASES[name].build(seed=0, dtype=dtype)


def pipe_with(name: str, dtype: torch.dtype, scheduler: Any) -> Any:
    """The family's tiny pipeline (built once per dtype) with ``scheduler`` configured from its own config."""
    pipe = _pipe(name, dtype)
    pipe.scheduler = scheduler
    return pipe


@functools.cache
def _configs() -> dict:
    # the pipelines' own (published) scheduler configurations, read before any test swaps a scheduler in
    return {name: dict(_pipe(name, torch.float32).scheduler.config) for name in CASES}


def swapped(name: str, dtype: torch.dtype, cls: Any, **kw: Any) -> Any:
    return pipe_with(name, dtype, cls.from_config(_configs()[name], **kw))


def start_noise(pipe: Any, dtype: torch.dtype, seed: int = 0, batch: int = 2) -> torch.Tensor:
    """Noise in the pipeline's latent format (Flux: packed), drawn in float32 and cast (the same draw per dtype)."""
    c = pipe.vae.config.latent_channels
    z = torch.randn(batch, c, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return type(pipe)._pack_latents(z, batch, c, 8, 8) if hasattr(type(pipe), "_pack_latents") else z


def run(pipe: Any, latents: torch.Tensor, name: str, prompt: Any = PROMPTS, **kw: Any) -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=N, latents=latents, output_type="latent", **CASES[name].guidance,
               **CASES[name].options, **kw)  # fmt: skip
    return out.images


def walk_kw(name: str, **kw: Any) -> dict:
    return {"num_inference_steps": N, **CASES[name].guidance, **CASES[name].options, **kw}


def rounding(a32: torch.Tensor, a64: torch.Tensor) -> float:
    """The float32 rounding of a walk as it carries it: its float32 result against its float64 one, floored at N
    ulps."""
    return max(rel(a32, a64), N * EPS32)


def _source_image(name: str) -> Any:
    """A 16x16 image the family's float32 pipeline made (the same PIL image for both dtypes)."""
    pipe = swapped(name, torch.float32, CASES[name].ours, gamma=1.0)
    return decode(pipe, run(pipe, start_noise(pipe, torch.float32, seed=3, batch=1), name, prompt="a cow"))[0]


# ------------------------------------------------------------------------------------------------ the swap


@pytest.mark.parametrize("name", FAMILIES)
def test_swap_is_one_line(name):
    """``pipe.scheduler = <BDIA scheduler>.from_config(pipe.scheduler.config)``: images come out, every call starts
    a fresh walk (two calls, one answer), and the scheduler ends holding the pair at the grid's last two points."""
    pipe = pipe_with(name, torch.float32, CASES[name].ours.from_config(_configs()[name], gamma=1.0))
    kw = walk_kw(name)
    first = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    again = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw).images
    assert len(first) == 2 and first[0].size == (16, 16)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, again, strict=True))
    state = pipe.scheduler.state
    sigmas = getattr(pipe.scheduler, "sigmas", None)
    end = [sigmas[-2].item(), 0.0] if sigmas is not None else timesteps_from(pipe.scheduler, N).tolist()[-2:]
    assert isinstance(state, State) and [state.t_prev, state.t] == end


@pytest.mark.parametrize("name", FAMILIES)
def test_gamma_zero_is_the_pipelines_own_walk(name):
    """gamma = 0 inside the pipeline walks its own deterministic scheduler's trajectory (DDIMScheduler for SD and
    SDXL, FlowMatchEulerDiscreteScheduler for SD3 and Flux) to rounding, in float32 and float64, with guidance."""
    walks = {}
    for dtype in (torch.float32, torch.float64):
        runs = []
        for cls, kw in ((CASES[name].reference, {}), (CASES[name].ours, {"gamma": 0.0})):
            pipe = swapped(name, dtype, cls, **kw)
            runs.append(run(pipe, start_noise(pipe, dtype), name))
        walks[dtype] = runs
    (ref32, ours32), (ref64, ours64) = walks[torch.float32], walks[torch.float64]
    bound = 4 * rounding(ref32, ref64)
    assert rel(ours32, ref32) < bound and rel(ours64, ref64) < bound


# ----------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", FAMILIES)
def test_image_inverts_and_samples_back_to_its_latent(name):
    """image -> invert -> sample (same prompt) gives ``encode(pipe, image)`` back to rounding, float32 and float64:
    the first inversion step from a lone latent is one plain step, which sampling undoes exactly. The errors pass
    through the sampling walk, whose own float32 rounding sets the bound. Euler / DDIM inversion does not come back."""
    image, kw = _source_image(name), walk_kw(name)
    back, latent, z = {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        pipe = swapped(name, dtype, CASES[name].ours, gamma=1.0)
        latent[dtype] = encode(pipe, image)
        z[dtype] = invert(pipe, image, "a cow", **kw)
        back[dtype] = sample(pipe, z[dtype], "a cow", output_type="latent", **kw)
    # the sampling walk's own rounding: from the same (float64) inverted pair in both dtypes
    pipe32 = swapped(name, torch.float32, CASES[name].ours, gamma=1.0)
    from64 = sample(pipe32, z[torch.float64].to(torch.float32), "a cow", output_type="latent", **kw)
    e = rounding(from64, back[torch.float64])
    assert rel(back[torch.float32], latent[torch.float32]) < 4 * e
    assert rel(back[torch.float64], latent[torch.float64]) < 4 * e * EPS64 / EPS32
    approx = CASES[name].approximate
    zd = invert(pipe32, image, "a cow", solver=approx, **kw)
    assert rel(sample(pipe32, zd, "a cow", solver=approx, output_type="latent", **kw), latent[torch.float32]) > 100 * e


@pytest.mark.parametrize("name", FAMILIES)
def test_a_pipeline_sample_inverts_to_its_noise(name):
    """noise -> the pipeline (BDIA scheduler, gamma = 1, guidance) -> invert from the scheduler's pair: the noise
    again, float32 and float64; resampling that pair rebuilds the pipeline's sample. The inversion walk's own
    float32 rounding (from the same pair in both dtypes) sets the bound."""
    kw, made, pairs, z = walk_kw(name), {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        pipe = swapped(name, dtype, CASES[name].ours, gamma=1.0)
        x = start_noise(pipe, dtype)
        made[dtype] = run(pipe, x, name)
        pairs[dtype] = pipe.scheduler.state
        z[dtype] = invert(pipe, pairs[dtype], PROMPTS, **kw)
        assert isinstance(z[dtype], State) and z[dtype].t == timesteps_from(pipe.scheduler, N, **_mu(pipe)).max()
        if dtype == torch.float32:
            again = sample(pipe, z[dtype], PROMPTS, output_type="latent", **kw)
    pipe64 = swapped(name, torch.float64, CASES[name].ours, gamma=1.0)
    e = rounding(z[torch.float32].x, invert(pipe64, pairs[torch.float32].to(torch.float64), PROMPTS, **kw).x)
    assert rel(z[torch.float32].x, start_noise(pipe64, torch.float32)) < 4 * e
    assert rel(z[torch.float64].x, start_noise(pipe64, torch.float64)) < 4 * e * EPS64 / EPS32
    assert rel(again, made[torch.float32]) < 4 * e


def _mu(pipe: Any) -> dict:
    """How Flux's pipeline sets its grid for the tiny latents' 16 tokens (its own calculate_shift, the oracle)."""
    config = pipe.scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return {}
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    args = (config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift)
    return {"mu": calculate_shift(16, *args), "sigmas": np.linspace(1.0, 1 / N, N)}


@pytest.mark.parametrize("name", FAMILIES)
def test_edit_under_a_new_prompt_and_strength(name):
    """The inverted pair sampled under another prompt is another image; ``strength`` inverts part of the walk, and
    sampling continues that partial pair where it is (back to the latent); a strength that disagrees is refused."""
    image, kw = _source_image(name), walk_kw(name)
    pipe = swapped(name, torch.float32, CASES[name].ours, gamma=1.0)
    latent = encode(pipe, image)
    z = invert(pipe, image, "a cow", **kw)
    edited = sample(pipe, z, "a bird", output_type="latent", **kw)
    assert rel(edited, latent) > 1e-2
    assert sample(pipe, z, "a bird", **kw)[0].size == (16, 16)
    half = invert(pipe, latent, "a cow", strength=0.5, **kw)
    grid = timesteps_from(pipe.scheduler, N, **_mu(pipe)).tolist()
    assert (half.t, half.t_prev) == (grid[5], grid[6])
    again = sample(pipe, half, "a cow", output_type="latent", **kw)
    pipe64 = swapped(name, torch.float64, CASES[name].ours, gamma=1.0)
    e = rounding(again, sample(pipe64, half.to(torch.float64), "a cow", output_type="latent", **kw))
    assert rel(again, latent) < 4 * e
    with pytest.raises(ValueError, match="strength=0.3 starts at"):
        sample(pipe, half, "a cow", strength=0.3, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_draws_the_pipelines_noise(name):
    """``sample(pipe, None, prompt, generator=g)`` is ``pipe(prompt, generator=g)`` with the same BDIA scheduler,
    num_images_per_prompt included: the same noise, conditioning and guidance (to the rounding of the guidance
    combination, which bdia fuses). A generator draws other numbers in float64 than in float32, so the walk's own
    rounding is measured from one start given as latents in both dtypes."""
    kw = walk_kw(name, num_images_per_prompt=2)
    ours, theirs, given = {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        pipe = swapped(name, dtype, CASES[name].ours, gamma=1.0)
        theirs[dtype] = pipe("a cat", generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
        ours[dtype] = sample(
            pipe, None, "a cat", generator=torch.Generator().manual_seed(7), output_type="latent", **kw
        )
        given[dtype] = run(pipe, start_noise(pipe, dtype), name, prompt="a cat", num_images_per_prompt=2)
    bound = 4 * rounding(given[torch.float32], given[torch.float64])
    assert ours[torch.float32].shape[0] == 2 and rel(ours[torch.float32], theirs[torch.float32]) < bound
    assert rel(ours[torch.float64], theirs[torch.float64]) < bound * EPS64 / EPS32


# ---------------------------------------------------------------------------------------- family specifics


def test_flux_true_cfg_and_guidance_embedding():
    """Flux: true CFG with a negative prompt is two calls combined as its pipeline combines them, so ``sample`` is
    the pipeline to the bit and its pair inverts exactly; the guidance embedding is conditioning (another value,
    another walk); a model without it (FLUX.1-schnell's kind) takes no guidance."""
    kw = walk_kw("flux", negative_prompt="a dog", true_cfg_scale=2.0)
    pipe = swapped("flux", torch.float32, BDIAFlowMatchScheduler, gamma=1.0)
    x = start_noise(pipe, torch.float32, batch=1)
    made = pipe("a cat", latents=x, output_type="latent", **kw).images
    assert torch.equal(sample(pipe, x, "a cat", output_type="latent", **kw), made)
    z = invert(pipe, pipe.scheduler.state, "a cat", **kw)
    assert rel(z.x, x) < 1e-5
    unguided = invert(pipe, pipe.scheduler.state, "a cat", **walk_kw("flux"))
    assert rel(unguided.x, x) > 1e-3  # the negative branch is part of the model that was walked
    other = invert(pipe, pipe.scheduler.state, "a cat", **{**kw, "guidance_scale": 1.0})
    assert rel(other.x, x) > 1e-3
    schnell = tiny_flux_pipeline(seed=0, guidance_embeds=False)
    schnell.scheduler = BDIAFlowMatchScheduler.from_config(schnell.scheduler.config)
    made = schnell("a cat", latents=x, output_type="latent", **walk_kw("flux")).images
    assert torch.equal(sample(schnell, x, "a cat", output_type="latent", **walk_kw("flux")), made)


def test_sdxl_size_conditioning_is_the_pipelines():
    """SDXL's time_ids (original size, crop, target size; the negative branch's own) go in as its pipeline puts
    them: the same walk as the pipeline with the same sizes, another walk with other sizes. (One image: for a batch
    of several the pipeline repeats its [negative, positive] pair of time_ids row by row, ``cat([neg, pos]).repeat(
    B, 1)``, while its UNet batch is [B negatives, B positives]; bdia gives each branch its own ids.)"""
    sizes = dict(original_size=(32, 24), crops_coords_top_left=(2, 0), target_size=(16, 16))
    negative = dict(negative_original_size=(8, 8), negative_target_size=(16, 16))
    pipe = swapped("sdxl", torch.float64, BDIAScheduler, gamma=1.0)
    x = start_noise(pipe, torch.float64, batch=1)
    kw = walk_kw("sdxl", **sizes, **negative)
    made = pipe("a cat", latents=x, output_type="latent", **kw).images
    ours = sample(pipe, x, "a cat", output_type="latent", **kw)
    plain = sample(pipe, x, "a cat", output_type="latent", **walk_kw("sdxl"))
    assert rel(ours, made) < 1e-12 and rel(plain, made) > 1e-6


def test_encode_decode_are_the_pipelines_vae():
    """``encode`` is the VAE's posterior mean normalised as each pipeline normalises it (shift and scale; Flux
    packs), ``decode`` its inverse through the VAE: what the pipeline's own img2img and decoding compute."""
    for name in FAMILIES:
        pipe = swapped(name, torch.float64, CASES[name].ours, gamma=1.0)
        image = _source_image(name)
        pixels = pipe.image_processor.preprocess(image).to(torch.float64)
        z = pipe.vae.encode(pixels).latent_dist.mode()
        c = pipe.vae.config
        expected = (z - (c.shift_factor or 0.0)) * c.scaling_factor
        if name == "flux":
            expected = type(pipe)._pack_latents(expected, *expected.shape)
        assert torch.equal(encode(pipe, image), expected), name
        decoded = decode(pipe, expected, output_type="pt")
        assert decoded.shape == (1, 3, 16, 16) and float(decoded.min()) >= 0 and float(decoded.max()) <= 1
        assert decode(pipe, expected, output_type="latent") is expected


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals_before_any_network_call():
    sd3 = swapped("sd3", torch.float32, BDIAFlowMatchScheduler)
    flux = swapped("flux", torch.float32, BDIAFlowMatchScheduler)
    sd = swapped("sd15", torch.float32, BDIAScheduler)
    x = start_noise(sd, torch.float32)
    with pytest.raises(TypeError, match="lacks unet, vae, scheduler, encode_prompt, image_processor"):
        invert(object(), x, "a cat")
    with pytest.raises(TypeError, match="unexpected keyword argument 'prompt_3'.*prompt_embeds"):
        invert(sd, x, "a cat", prompt_3="a dog")
    with pytest.raises(ValueError, match="'guidance_rescale' is not supported"):
        invert(sd, x, "a cat", guidance_rescale=0.7)
    with pytest.raises(ValueError, match="'skip_guidance_layers' is not supported"):
        invert(sd3, start_noise(sd3, torch.float32), "a cat", skip_guidance_layers=[0])
    with pytest.raises(ValueError, match="give one prompt for all of them, or latents with a batch of 2"):
        invert(sd, x[:1], PROMPTS)
    with pytest.raises(ValueError, match="generator draws the starting noise"):
        sample(sd, x, "a cat", generator=torch.Generator())
    with pytest.raises(ValueError, match="sigmas and mu are for flow-matching"):
        invert(sd, x, "a cat", sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="Flux's pipeline computes it"):
        invert(flux, start_noise(flux, torch.float32), "a cat", mu=0.5)
    with pytest.raises(ValueError, match="hold 16 tokens, but height=32"):
        invert(flux, start_noise(flux, torch.float32), "a cat", height=32, width=32)
    with pytest.raises(ValueError, match="packed tokens"):
        invert(flux, x, "a cat")
    z = invert(sd3, start_noise(sd3, torch.float32), "a cat", num_inference_steps=N, max_sequence_length=8)
    with pytest.raises(ValueError, match="num_inference_steps=12"):
        sample(sd3, z, "a cat", num_inference_steps=12, max_sequence_length=8)
    # the walk's own refusals come before the text encoders run, too
    calls: list[int] = []
    encoders = [getattr(sd3, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    hooks = [e.register_forward_hook(lambda *a: calls.append(1)) for e in encoders if e is not None]
    try:
        with pytest.raises(ValueError, match="can amplify rounding errors"):
            invert(sd3, start_noise(sd3, torch.float32), "a cat", gamma=0.5, num_inference_steps=50)
    finally:
        for h in hooks:
            h.remove()
    assert calls == []
    ddim = swapped("sd3", torch.float32, diffusers.DDIMScheduler)
    with pytest.raises(TypeError, match="flow-matching model, but its scheduler is DDIMScheduler"):
        invert(ddim, start_noise(ddim, torch.float32), "a cat")


def test_callback_on_step_end_reads_but_does_not_replace():
    """The pipelines' callback sees each step's latents with the step index and the scheduler's timestep; a walk
    keeps its pair, so a callback that returns other latents is refused."""
    pipe = swapped("sd3", torch.float32, BDIAFlowMatchScheduler)
    seen = []

    def watch(p, i, t, kw):
        seen.append((i, float(t), kw["latents"].shape))
        return kw

    sample(pipe, start_noise(pipe, torch.float32), "a cat", callback_on_step_end=watch, output_type="latent",
           **walk_kw("sd3"))  # fmt: skip
    pipe.scheduler.set_timesteps(N)
    assert [i for i, _, _ in seen] == list(range(N))
    assert seen[0][1] == float(pipe.scheduler.timesteps[0]) and seen[0][2] == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="returned other latents"):
        sample(pipe, start_noise(pipe, torch.float32), "a cat", output_type="latent",
               callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 2}, **walk_kw("sd3"))  # fmt: skip


@pytest.mark.parametrize("name", ["sd15", "sd3"])
def test_a_pipeline_state_carries_its_grid_and_solver(name):
    """The scheduler's pair says where it came from, as bdia.sample's does: inverting it on another step count of
    a grid family that shares its last two points (every Stable Diffusion ``leading`` grid ends (1, 0)), or with
    another gamma, is refused before any network call instead of silently inverting the wrong walk."""
    pipe = swapped(name, torch.float32, CASES[name].ours, gamma=0.5)
    run(pipe, start_noise(pipe, torch.float32), name)
    state = pipe.scheduler.state
    grid = timesteps_from(pipe.scheduler, N, **_mu(pipe)).tolist()
    made_by = BDIA(CASES[name].approximate, 0.5)  # (BDIA over the family's integrator: Euler or DDIM)
    assert list(state.grid) == grid and state.solver == identity(made_by)
    kw = walk_kw(name)
    assert torch.isfinite(invert(pipe, state, PROMPTS, **kw).x).all()  # (gamma: the scheduler's, 0.5)
    with pytest.raises(ValueError, match="made by BDIA"):
        invert(pipe, state, PROMPTS, **{**kw, "gamma": 1.0})
    if name == "sd15":  # (the flow grids of other step counts share no end)
        with pytest.raises(ValueError, match="next time after"):
            invert(pipe, state, PROMPTS, **{**kw, "num_inference_steps": 2 * N})


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_img2img_pipelines_take_the_flow_scheduler(name):
    """SD3's and Flux's img2img pipelines (scale_noise after set_begin_index, a first step mid-grid) run with the
    flow scheduler, gamma = 0 walking FlowMatchEulerDiscreteScheduler's trajectory to rounding; and invert / sample
    take the img2img pipeline as they take the text-to-image one (its components, its defaults)."""
    cls = {"sd3": diffusers.StableDiffusion3Img2ImgPipeline, "flux": diffusers.FluxImg2ImgPipeline}[name]
    image, outs = _source_image(name), {}
    for dtype in (torch.float32, torch.float64):
        base = _pipe(name, dtype)
        img2img = cls(**{k: v for k, v in base.components.items() if k in inspect.signature(cls).parameters})
        img2img.set_progress_bar_config(disable=True)
        for label, scheduler in (("ref", CASES[name].reference), ("ours", CASES[name].ours)):
            img2img.scheduler = scheduler.from_config(_configs()[name], **({"gamma": 0.0} if label == "ours" else {}))
            kw = walk_kw(name, strength=0.6, height=16, width=16)
            g = torch.Generator().manual_seed(5)
            outs[label, dtype] = img2img("a cat", image=image, generator=g, output_type="latent", **kw).images
    bound = 4 * rounding(outs["ref", torch.float32], outs["ref", torch.float64])
    assert rel(outs["ours", torch.float32], outs["ref", torch.float32]) < bound
    assert rel(outs["ours", torch.float64], outs["ref", torch.float64]) < bound
    img2img.scheduler = CASES[name].ours.from_config(_configs()[name], gamma=1.0)
    kw = walk_kw(name, height=16, width=16)  # (a FluxImg2ImgPipeline's default size is 128 latent pixels a side)
    back = sample(img2img, invert(img2img, image, "a cow", **kw), "a cow", output_type="latent", **kw)
    base = swapped(name, torch.float64, CASES[name].ours, gamma=1.0)
    assert torch.equal(back, sample(base, invert(base, image, "a cow", **kw), "a cow", output_type="latent", **kw))
