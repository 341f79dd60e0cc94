"""The diffusers integration's speed: ``BDIAScheduler.step`` against ``DDIMScheduler.step``, and end to end.

1. Per step: each scheduler walks 50 steps given a fixed network output (the network excluded, as in a pipeline's
   loop after the UNet call: ``set_timesteps`` once, then ``step`` at every timestep), on 4x4x64x64 float32
   latents and on the tiny pipeline's 1x4x8x8 (where Python overhead is all there is); time per step = walk time /
   50. DDIMScheduler, and BDIAScheduler at gamma = 0, 1 and 0.5 (one mechanism: the same ``bdia.solvers.BDIA``
   step, whose gamma = 0 and gamma = 1 paths are the cheapest).
2. End to end through ``bdia.diffusers.tiny_pipeline`` (a StableDiffusionPipeline with tiny random weights: 4x8x8
   latents, classifier-free guidance, 50 steps, images decoded): the pipeline with DDIMScheduler, with
   BDIAScheduler(gamma=1), and ``bdia.diffusers.sample`` (bdia.sample over ``model_from`` with ``CFG``).
3. Exactness through the same pipeline, float32 and float64: parity with DDIMScheduler (gamma = 0) and with
   bdia.sample, round trips of ``invert`` / ``sample``, and DDIM inversion's round trip for comparison.

Rounds interleaved (``benchmarks.interleaved``), one intra-op thread, subnormal floats flushed to zero (see
``run``); medians and the ratio of minima reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bdia.report import relative_error
from benchmarks import IMG, RESULTS, interleaved, print_table, pyplot, save, threads

__all__ = ["run"]

SD_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _walk(scheduler, out: torch.Tensor, x: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(out, t, x).prev_sample
    return x


def per_step(steps: int, repeats: int, inner: int, shape: tuple[int, ...] = (4, 4, 64, 64)) -> dict:
    from diffusers import DDIMScheduler

    from bdia.diffusers import BDIAScheduler

    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(shape, generator=g) for _ in range(2))
    schedulers = {
        "DDIMScheduler.step": DDIMScheduler(**SD_SCHEDULER),
        "BDIAScheduler.step gamma=0": BDIAScheduler(**SD_SCHEDULER, gamma=0.0),
        "BDIAScheduler.step gamma=1": BDIAScheduler(**SD_SCHEDULER, gamma=1.0),
        "BDIAScheduler.step gamma=0.5": BDIAScheduler(**SD_SCHEDULER, gamma=0.5),
    }
    fns = {k: (lambda s=s: _walk(s, out, x, steps)) for k, s in schedulers.items()}
    ddim, bdia0 = _walk(schedulers["DDIMScheduler.step"], out, x, steps), fns["BDIAScheduler.step gamma=0"]()
    agreement = float((ddim - bdia0).abs().max() / ddim.abs().max())
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats, inner)
    base = "DDIMScheduler.step"
    rows = [
        {
            "operation": k,
            "median us/step": statistics.median(v) / steps * 1e6,
            "x DDIM": statistics.median(v) / statistics.median(times[base]),
            "x DDIM (min)": min(v) / min(times[base]),
        }
        for k, v in times.items()
    ]
    info = {"shape": list(shape), "steps": steps, "repeats": repeats, "inner": inner}
    return {**info, "rows": rows, "gamma0_vs_ddim_max_rel": agreement}


def end_to_end(steps: int, repeats: int) -> dict:
    from diffusers import DDIMScheduler

    from bdia.diffusers import BDIAScheduler, sample, tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    config = pipe.scheduler.config
    ddim, ours = DDIMScheduler.from_config(config), BDIAScheduler.from_config(config, gamma=1.0)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = dict(num_inference_steps=steps, guidance_scale=7.5)

    def with_scheduler(scheduler):
        def call():
            pipe.scheduler = scheduler
            return pipe("a cat", latents=latents, **kw).images

        return call

    fns = {
        "pipeline, DDIMScheduler": with_scheduler(ddim),
        "pipeline, BDIAScheduler gamma=1": with_scheduler(ours),
        "bdia.diffusers.sample gamma=1": lambda: sample(pipe, latents, "a cat", **kw),
    }
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    base = "pipeline, DDIMScheduler"
    rows = [
        {
            "run": k,
            "steps": steps,
            "median ms": statistics.median(v) * 1e3,
            "x DDIM": statistics.median(v) / statistics.median(times[base]),
            "x DDIM (min)": min(v) / min(times[base]),
        }
        for k, v in times.items()
    ]
    return {"repeats": repeats, "rows": rows}


def exactness(steps: int) -> dict:
    """Parity and round trips through the tiny pipeline (CFG 3.0, Stable Diffusion 1.5's scheduler config), in
    float32 and float64 (the same weights, cast): relative L2 errors."""
    from diffusers import DDIMScheduler

    import bdia
    from bdia.diffusers import BDIAScheduler, invert, model_from, sample, timesteps_from, tiny_pipeline
    from bdia.solvers import BDIA, DDIM

    rows = []
    for dtype in (torch.float32, torch.float64):
        pipe = tiny_pipeline(seed=0, dtype=dtype)
        config = pipe.scheduler.config
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
        prompts, kw = ["a cat", "a dog"], dict(num_inference_steps=steps, guidance_scale=3.0)

        def latents_with(scheduler, guidance_scale=3.0, prompts=prompts, noise=noise, pipe=pipe):
            pipe.scheduler = scheduler
            out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, latents=noise,
                       output_type="latent")  # fmt: skip
            return out.images

        ddim = latents_with(DDIMScheduler.from_config(config))
        bdia0 = latents_with(BDIAScheduler.from_config(config, gamma=0.0))
        unguided = latents_with(BDIAScheduler.from_config(config, gamma=1.0), guidance_scale=1.0)
        cond = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        ts = timesteps_from(pipe.scheduler, steps)
        ref = bdia.sample(
            model_from(pipe.unet, pipe.scheduler), noise, ts, BDIA(DDIM(), 1.0), encoder_hidden_states=cond
        )
        sampled = latents_with(BDIAScheduler.from_config(config, gamma=1.0))
        state = pipe.scheduler.state
        z = invert(pipe, state, prompt=prompts, **kw)
        again = sample(pipe, z, prompt=prompts, output_type="latent", **kw)
        # a real image: its latent (VAE mean) inverted with the source prompt, then resampled with it
        decoded = pipe.vae.decode(sampled / pipe.vae.config.scaling_factor).sample
        image = pipe.image_processor.postprocess(decoded, output_type="pt")  # in [0, 1], as an image is given
        pixels = pipe.image_processor.preprocess(image)
        latent = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        reach = [0.0]  # how far the walk strays: the largest |x| / alpha(t) it meets (rounding scales with it)

        def track(st, reach=reach, schedule=pipe.scheduler.schedule):
            reach[0] = max(reach[0], float(st.x.abs().max()) / schedule.at(st.t).alpha)

        zi = invert(pipe, image, prompt=prompts, callback=track, **kw)
        edit_same = sample(pipe, zi, prompt=prompts, output_type="latent", **kw)
        # the approximate baseline: DDIM inversion, then DDIM sampling, same model and guidance
        uncond = pipe.encode_prompt(prompts, "cpu", 1, True)[1]
        guided = model_from(pipe.unet, pipe.scheduler, guidance_scale=3.0, encoder_hidden_states=uncond)
        cond3 = pipe.encode_prompt(prompts, "cpu", 1, True)[0]
        zd = bdia.invert(guided, latent, ts, DDIM(), encoder_hidden_states=cond3)
        ddim_back = bdia.sample(guided, zd.x, ts, DDIM(), encoder_hidden_states=cond3).x
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "gamma=0 vs DDIMScheduler": relative_error(bdia0, ddim),
                "scheduler vs bdia.sample (no CFG), bitwise": bool(torch.equal(unguided, ref.x)),
                "noise->pipe->invert": relative_error(z.x, noise),
                "pair->invert->sample": relative_error(again, sampled),
                "image->invert->sample": relative_error(edit_same, latent),
                "image: max |latent|": float(latent.abs().max()),
                "image walk: max |x|/alpha": reach[0],
                "DDIM inversion: image->invert->sample": relative_error(ddim_back, latent),
            }
        )
    return {"steps": steps, "guidance_scale": 3.0, "rows": rows}


def _plot(step: dict, e2e: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    rows = step["rows"]
    axes[0].barh([r["operation"] for r in rows], [r["median us/step"] for r in rows], color="tab:blue")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("median time per step [us]")
    axes[0].set_title(f"scheduler step on {'x'.join(map(str, step['shape']))} float32 (network excluded)", fontsize=9)
    r2 = e2e["rows"]
    axes[1].barh([r["run"] for r in r2], [r["x DDIM"] for r in r2], color="tab:green")
    axes[1].invert_yaxis()
    axes[1].axvline(1.0, color="k", lw=0.6)
    for i, r in enumerate(r2):
        axes[1].text(r["x DDIM"], i, f" {r['x DDIM']:.3f}", va="center", fontsize=8)
    axes[1].set_title(f"tiny SD pipeline, {r2[0]['steps']} steps: time / DDIM's", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextmanager
def flushed() -> Iterator[None]:
    """Subnormal floats flushed to zero while timing.

    The random network's softmaxes and activations make subnormals at a rate that depends on the latents, and x86
    CPUs compute with them many times slower. Measured on the tiny pipeline: 50 UNet calls along DDIMScheduler's
    and BDIAScheduler's trajectories took 781 and 647 ms (minima of 7) as they are, 320 and 314 ms with subnormals
    flushed. End to end the trajectory, not the scheduler, would set the ratio; flushed, the network's cost no
    longer depends on the values it is given. (The exactness figures are computed without it.)
    """
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


def run(quick: bool = False, results_dir: Path = RESULTS, img_dir: Path = IMG) -> dict:
    with threads(1), torch.inference_mode():
        return _run(quick, Path(results_dir), Path(img_dir))


def _run(quick: bool, results_dir: Path, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    with flushed():
        step = per_step(steps=50, repeats=3 if quick else 31, inner=1 if quick else 3)
        small = per_step(steps=50, repeats=3 if quick else 31, inner=1 if quick else 3, shape=(1, 4, 8, 8))
        e2e = end_to_end(steps=5 if quick else 50, repeats=1 if quick else 41)
    print_table(step["rows"], f"Scheduler step, {step['shape']} float32, network excluded (interleaved rounds)")
    agreement = step["gamma0_vs_ddim_max_rel"]
    print(f"BDIAScheduler gamma=0 vs DDIMScheduler, 50 steps: max |difference| / max |latent| = {agreement:.2e}")
    print_table(small["rows"], f"Scheduler step, {small['shape']} float32 (the tiny pipeline's latents)")
    # what the per-step difference predicts end to end (the measured ratio carries the machine's noise)
    us = {r["operation"]: r["median us/step"] for r in small["rows"]}
    ddim_ms = e2e["rows"][0]["median ms"]
    saved_ms = e2e["rows"][0]["steps"] * (us["BDIAScheduler.step gamma=1"] - us["DDIMScheduler.step"]) / 1e3
    e2e["predicted_bdia_ratio"] = (ddim_ms + saved_ms) / ddim_ms
    print_table(e2e["rows"], "End to end, tiny Stable Diffusion pipeline (CFG 7.5, images decoded)")
    print(f"BDIAScheduler / DDIMScheduler end to end, predicted from the step times: {e2e['predicted_bdia_ratio']:.4f}")
    exact = exactness(steps=5 if quick else 50)
    print_table(exact["rows"], f"Exactness through the tiny pipeline, {exact['steps']} steps, CFG 3 (relative L2)")
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot(step, e2e, img_dir / "diffusers_speed.png")
    payload = {
        "quick": quick,
        "subnormals_flushed_while_timing": True,
        "per_step": step,
        "per_step_tiny_latents": small,
        "end_to_end": e2e,
        "exactness": exact,
        "seconds": time.perf_counter() - t0,
    }
    save(results_dir, "diffusers", payload)
    return payload
