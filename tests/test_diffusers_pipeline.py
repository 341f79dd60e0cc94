"""bdia.diffusers through a real StableDiffusionPipeline (tiny random UNet2DConditionModel with cross-attention,
AutoencoderKL, CLIPTextModel and a letters-only tokenizer, built offline by ``tiny_pipeline``): the pipeline runs
with BDIAScheduler, matches DDIMScheduler at gamma = 0 and bdia.sample at gamma = 1, and ``invert`` / ``sample``
round-trip exactly with classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import bdia  # noqa: E402
from bdia import State  # noqa: E402
from bdia.diffusers import (  # noqa: E402
    BDIAScheduler,
    encode,
    invert,
    model_from,
    sample,
    timesteps_from,
    tiny_flux_pipeline,
    tiny_pipeline,
)
from bdia.solvers import BDIA, DDIM  # noqa: E402
from tests.test_diffusers import Extent  # noqa: E402

PROMPTS = ["a cat", "a dog"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def pipe64():
    return tiny_pipeline(seed=0, dtype=torch.float64)


def noise(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(pipe, scheduler, latents, n=20, guidance_scale=3.0, prompt=PROMPTS, **kw):
    pipe.scheduler = scheduler
    return pipe(prompt, num_inference_steps=n, guidance_scale=guidance_scale, latents=latents, **kw).images


def bdia_scheduler(pipe, **kw) -> BDIAScheduler:
    return BDIAScheduler.from_config(pipe.scheduler.config, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_pipeline_runs_with_bdia_scheduler(pipe):
    """The drop-in line: images come out, the walk is reset by every call (two calls, one answer), and the
    scheduler ends holding the pair at the grid's last two points."""
    pipe.scheduler = bdia_scheduler(pipe, gamma=1.0)
    first = pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    again = pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    assert len(first.images) == 2 and first.images[0].size == (16, 16)
    assert np.array_equal(np.asarray(first.images[1]), np.asarray(again.images[1]))
    grid = timesteps_from(pipe.scheduler, 10).tolist()
    assert (pipe.scheduler.state.t_prev, pipe.scheduler.state.t) == (grid[-2], grid[-1])


def test_gamma_zero_matches_ddimscheduler(pipe):
    """To rounding, not to the bit (bdia's step is one fused combination with float64 coefficients)."""
    ddim = run(pipe, diffusers.DDIMScheduler.from_config(pipe.scheduler.config), noise(), output_type="latent")
    ours = run(pipe, bdia_scheduler(pipe, gamma=0.0), noise(), output_type="latent")
    assert rel(ours, ddim) < 1e-5


@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_pipeline_matches_bdia_sample(pipe, gamma):
    """The pipeline with BDIAScheduler and bdia.sample over model_from with CFG walk the same trajectory; to rounding
    only because the pipeline and bdia.models.CFG round the guidance combination differently."""
    n, x = 20, noise()
    latents = run(pipe, bdia_scheduler(pipe, gamma=gamma), x, n, output_type="latent")
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    model = model_from(pipe.unet, pipe.scheduler, guidance_scale=3.0, encoder_hidden_states=uncond)
    with torch.no_grad():
        ref = bdia.sample(model, x, timesteps_from(pipe.scheduler, n), BDIA(DDIM(), gamma), encoder_hidden_states=cond)
    assert rel(latents, ref.x) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_invert_a_pipeline_sample_returns_its_noise(pipe, pipe64, dtype):
    """Noise -> pipeline (BDIAScheduler, gamma = 1, CFG) -> invert from the scheduler's pair: the noise again."""
    p, n, x = (pipe if dtype == torch.float32 else pipe64), 50, noise(dtype)
    latents = run(p, bdia_scheduler(p, gamma=1.0), x, n, output_type="latent")
    kw = dict(prompt=PROMPTS, num_inference_steps=n, guidance_scale=3.0, callback=Extent(p.scheduler.schedule))
    z = invert(p, p.scheduler.state, **kw)
    assert isinstance(z, State) and z.t == 981.0  # Stable Diffusion's leading grid, steps_offset 1
    assert float((z.x - x).abs().max()) < kw["callback"].bound(n, dtype, z.t, 3.0)
    # and resampling that pair under the same prompt rebuilds the sample
    again = sample(p, z, output_type="latent", **kw)
    assert float((again - latents).abs().max()) < kw["callback"].bound(n, dtype, 0.0, 3.0)


def test_edit_a_real_image(pipe):
    """An image -> invert (its first step is plain DDIM) -> sample under the same prompt: the image's latent, to
    rounding; under another prompt: another image. Partial inversion by strength continues where it stopped."""
    pipe.scheduler = bdia_scheduler(pipe)
    image = run(pipe, pipe.scheduler, noise(seed=3)[:1], 10, prompt="a cow")[0]
    latent = encode(pipe, image)  # the VAE's posterior mean, scaled as the pipeline scales it
    extent = Extent(pipe.scheduler.schedule)
    kw = dict(num_inference_steps=20, guidance_scale=3.0)
    z = invert(pipe, image, prompt="a cow", callback=extent, **kw)
    same = sample(pipe, z, prompt="a cow", output_type="latent", **kw)
    assert float((same - latent).abs().max()) < extent.bound(20, torch.float32, 0.0, 3.0)
    other = sample(pipe, z, prompt="a bird", output_type="latent", **kw)
    assert rel(other, latent) > 1e-2
    assert sample(pipe, z, prompt="a bird", output_type="pil", **kw)[0].size == (16, 16)
    extent = Extent(pipe.scheduler.schedule)
    half = invert(pipe, latent, prompt="a cow", strength=0.5, callback=extent, **kw)
    grid = timesteps_from(pipe.scheduler, 20).tolist()
    assert (half.t, half.t_prev) == (grid[10], grid[11])
    again = sample(pipe, half, prompt="a cow", output_type="latent", **kw)
    assert float((again - latent).abs().max()) < extent.bound(10, torch.float32, 0.0, 3.0)
    with pytest.raises(ValueError, match="strength=0.3 starts at"):
        sample(pipe, half, prompt="a cow", strength=0.3, **kw)


def test_prompt_embeds_and_prompts_agree(pipe):
    pipe.scheduler = bdia_scheduler(pipe)
    x, kw = noise(), dict(num_inference_steps=10, guidance_scale=3.0)
    cond, uncond = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="a dog")
    by_text = invert(pipe, x, prompt="a cat", negative_prompt="a dog", **kw)
    by_embeds = invert(pipe, x, prompt_embeds=cond, negative_prompt_embeds=uncond, **kw)
    assert torch.equal(by_text.x, by_embeds.x)
    # guidance_scale <= 1 is the conditional model alone, as in the pipeline
    assert not torch.equal(invert(pipe, x, prompt="a cat", num_inference_steps=10, guidance_scale=1.0).x, by_text.x)


def test_pipeline_errors(pipe):
    pipe.scheduler = bdia_scheduler(pipe)
    kw = dict(prompt="a cat", guidance_scale=3.0)
    z = invert(pipe, noise(), num_inference_steps=10, **kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(pipe, z, num_inference_steps=20, **kw)  # a pair from another grid
    with pytest.raises(ValueError, match="num_inference_steps=20"):
        invert(pipe, z, num_inference_steps=20, **kw)
    with pytest.raises(ValueError, match="strength"):
        invert(pipe, noise(), strength=0.0, **kw)
    with pytest.raises(ValueError, match="prompt"):
        invert(pipe, noise(), guidance_scale=3.0)
    with pytest.raises(ValueError, match="channels"):
        invert(pipe, torch.zeros(1, 5, 8, 8), **kw)
    with pytest.raises(TypeError, match="Stable Diffusion"):
        invert(object(), noise(), **kw)
    with pytest.raises(TypeError, match="bdia.State"):
        sample(pipe, [1.0], **kw)


def test_img2img_and_save_load(pipe, tmp_path):
    """StableDiffusionImg2ImgPipeline starts part way (add_noise, a first step mid-grid); a saved pipeline loads
    its BDIAScheduler back (model_index.json names bdia.diffusers)."""
    pipe.scheduler = bdia_scheduler(pipe, gamma=0.5)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = run(pipe, pipe.scheduler, noise(seed=4)[:1], 5, prompt="a cow")[0]
    out = img2img("a cat", image=image, strength=0.5, num_inference_steps=10, guidance_scale=3.0).images[0]
    assert out.size == (16, 16) and pipe.scheduler.state.t == 0.0
    pipe.save_pretrained(tmp_path)
    back = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    assert type(back.scheduler) is BDIAScheduler and back.scheduler.config.gamma == 0.5


def readme_stand_ins() -> dict:
    """What the README's "With diffusers" section takes as the user's: pipelines (Stable Diffusion, Flux), a prompt,
    noise, embeddings."""
    pipe = tiny_pipeline(seed=0)
    embeds = pipe.encode_prompt("a cat", "cpu", 1, False)[0]
    flux = tiny_flux_pipeline(seed=0)
    return {"pipe": pipe, "flux": flux, "prompt": "a cat", "start": noise()[:1], "prompt_embeds": embeds}
