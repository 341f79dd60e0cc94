"""The diffusers integration: exactness and speed through every covered pipeline family, and the schedulers' step.

1. Per step: each scheduler walks 50 steps given a fixed network output (the network excluded, as in a pipeline's
   loop after the UNet call: ``set_timesteps`` once, then ``step`` at every timestep), on 4x4x64x64 float32
   latents and on the tiny pipeline's 1x4x8x8 (where Python overhead is all there is); time per step = walk time /
   50. DDIMScheduler, and BDIAScheduler at gamma = 0, 1 and 0.5 (one mechanism: the same ``bdia.solvers.BDIA``
   step, whose gamma = 0 and gamma = 1 paths are the cheapest).
2. End to end through ``bdia.diffusers.tiny_pipeline`` (a StableDiffusionPipeline with tiny random weights: 4x8x8
   latents, classifier-free guidance, 50 steps, images decoded): the pipeline with DDIMScheduler, with
   BDIAScheduler(gamma=1), and ``bdia.diffusers.sample`` (bdia.sample over ``model_from`` with ``CFG``).
3. Per pipeline family (SD 1.5, SDXL, SD3, Flux, on their tiny pipelines, at their pipelines' default step
   counts): gamma = 0 against the pipeline's own deterministic walk (DDIMScheduler, FlowMatchEulerDiscreteScheduler),
   float32 and float64; a pipeline-made sample's pair inverted back to its noise, and an image inverted and
   resampled against ``encode(pipe, image)``, float32 and float64; the same with Euler / DDIM inversion; pixel PSNR
   beside the VAE-only ceiling; the BDIA scheduler's time per step against the pipeline's own scheduler on the
   real model's latent shape (``family``).

Rounds interleaved (``benchmarks.interleaved``), one intra-op thread, subnormal floats flushed to zero while timing
(see ``flushed``); medians and the ratio of minima reported.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bdia.report import relative_error
from benchmarks import interleaved, outputs, print_table, pyplot, save, threads

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


# Per pipeline family: its tiny pipeline, the prompt keywords every call passes, the guidance its pipeline uses,
# the latent shape of the real model at its native resolution (for the per-step time), and whether it is a flow
# model (its schedulers and its approximate inversion: Euler; else DDIM)
FAMILIES = {
    "SD 1.5": ("tiny_pipeline", {}, {"guidance_scale": 3.0}, (1, 4, 64, 64), False),
    "SDXL": ("tiny_sdxl_pipeline", {}, {"guidance_scale": 3.0}, (1, 4, 128, 128), False),
    "SD3": ("tiny_sd3_pipeline", {"max_sequence_length": 8}, {"guidance_scale": 3.0}, (1, 16, 128, 128), True),
    "Flux": ("tiny_flux_pipeline", {"max_sequence_length": 8}, {"guidance_scale": 3.5}, (1, 4096, 64), True),
}


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of images in [0, 1]."""
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def family(name: str, steps: int, repeats: int, inner: int) -> dict:
    """One pipeline family: gamma = 0 parity with the pipeline's own deterministic scheduler (DDIMScheduler, or
    FlowMatchEulerDiscreteScheduler), latent round trips in float32 and float64, pixel PSNR of the reconstruction
    beside the VAE's own (encode -> decode) and beside Euler / DDIM inversion's, and the BDIA scheduler's time per
    step against the pipeline's own scheduler (interleaved, network excluded, on the real model's latent shape)."""
    import diffusers

    import bdia.diffusers as bd
    from bdia.solvers import DDIM, Euler

    builder, options, guidance, shape, flow = FAMILIES[name]
    ours_cls = bd.BDIAFlowMatchScheduler if flow else bd.BDIAScheduler
    ref_cls = diffusers.FlowMatchEulerDiscreteScheduler if flow else diffusers.DDIMScheduler
    kw = {"num_inference_steps": steps, **guidance, **options}
    prompts = ["a cat", "a dog"]
    out: dict = {"family": name, "steps": steps, **guidance}
    pipes = {dtype: getattr(bd, builder)(seed=0, dtype=dtype) for dtype in (torch.float32, torch.float64)}
    own = pipes[torch.float32].scheduler  # the pipeline's own scheduler, as published
    config = own.config
    for dtype, pipe in pipes.items():
        tag = str(dtype).removeprefix("torch.")
        layout = bd.family_of(pipe)  # (its noise: 16x16 images, packed for Flux)
        g = torch.Generator().manual_seed(0)
        x = layout.pack(pipe, torch.randn(layout.noise_shape(pipe, 2, 16, 16), generator=g).to(dtype))
        walks = {}
        for label, scheduler in (
            ("ref", ref_cls.from_config(config)),
            ("gamma0", ours_cls.from_config(config, gamma=0.0)),
        ):
            pipe.scheduler = scheduler
            walks[label] = pipe(prompts, latents=x, output_type="latent", **kw).images
        out[f"gamma=0 vs {ref_cls.__name__} ({tag})"] = relative_error(walks["gamma0"], walks["ref"])
        pipe.scheduler = ours_cls.from_config(config, gamma=1.0)
        made = pipe(prompts, latents=x, output_type="latent", **kw).images
        z = bd.invert(pipe, pipe.scheduler.state, prompts, **kw)
        out[f"sample pair -> invert vs noise ({tag})"] = relative_error(z.x, x)
    # an image the float32 pipeline made, inverted and resampled
    pipe = pipes[torch.float32]
    image = bd.decode(pipe, made[:1], output_type="pt")
    for dtype, p in pipes.items():
        tag = str(dtype).removeprefix("torch.")
        p.scheduler = ours_cls.from_config(config, gamma=1.0)
        latent = bd.encode(p, image.to(dtype))
        back = bd.sample(p, bd.invert(p, image.to(dtype), "a cat", **kw), "a cat", output_type="latent", **kw)
        out[f"image -> invert -> sample vs encode ({tag})"] = relative_error(back, latent)
        if dtype == torch.float32:
            approx = Euler() if flow else DDIM()
            za = bd.invert(p, image, "a cat", solver=approx, **kw)
            rough = bd.sample(p, za, "a cat", solver=approx, output_type="latent", **kw)
            out[f"{approx!r} inversion: image -> sample vs encode (float32)"] = relative_error(rough, latent)
            ceiling = bd.decode(p, latent, output_type="pt")
            out["PSNR VAE only (encode -> decode) dB"] = psnr(ceiling, image)
            out["PSNR BDIA (invert -> sample -> decode) dB"] = psnr(bd.decode(p, back, output_type="pt"), image)
            out[f"PSNR {approx!r} inversion dB"] = psnr(bd.decode(p, rough, output_type="pt"), image)
            # against the VAE-only reconstruction: how far the inversion's latent error moves the pixels
            out["PSNR BDIA vs VAE-only image dB"] = psnr(bd.decode(p, back, output_type="pt"), ceiling)
            out[f"PSNR {approx!r} inversion vs VAE-only image dB"] = psnr(
                bd.decode(p, rough, output_type="pt"), ceiling
            )
    with flushed():  # (only the timing depends on it)
        out.update(_per_step(own, ours_cls.from_config(config, gamma=1.0), ours_cls.from_config(config, gamma=0.0),
                             shape, steps, repeats, inner))  # fmt: skip
    return out


def _per_step(own, ours, plain, shape: tuple[int, ...], steps: int, repeats: int, inner: int) -> dict:
    """The BDIA scheduler's ``step`` (gamma = 1, and gamma = 0: the plain integrator) against the pipeline's own
    scheduler's, each walking ``steps`` steps given a fixed network output (a pipeline's loop after the network
    call, ``set_timesteps`` included), interleaved rounds."""
    g = torch.Generator().manual_seed(0)
    x, out = (torch.randn(shape, generator=g) for _ in range(2))
    grid = {}
    if own.config.get("use_dynamic_shifting", False):  # as Flux's pipeline sets it for the real model's tokens
        import numpy as np

        from bdia.diffusers.pipelines import _mu

        grid = {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": _mu(own.config, shape[1], 1.15)}

    def walk(scheduler):
        # as the pipeline's loop: the model input through scale_model_input where the scheduler has one (Euler's)
        scale = getattr(type(scheduler), "scale_model_input", None)

        def go():
            scheduler.set_timesteps(steps, **grid)
            y = x
            for t in scheduler.timesteps:
                y = scheduler.step(out, t, y if scale is None else scale(scheduler, y, t), return_dict=False)[0]
            return y

        return go

    name = type(ours).__name__
    fns = {type(own).__name__: walk(own), f"{name} gamma=1": walk(ours), f"{name} gamma=0": walk(plain)}
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats, inner)
    base = times[type(own).__name__]
    row = {
        "per-step shape": list(shape),
        **{f"{k}.step us": statistics.median(v) / steps * 1e6 for k, v in times.items()},
    }
    for gamma in ("1", "0"):
        ts = times[f"{name} gamma={gamma}"]
        row[f"per-step time ratio gamma={gamma} (median)"] = statistics.median(ts) / statistics.median(base)
        row[f"per-step time ratio gamma={gamma} (minima)"] = min(ts) / min(base)
    return row


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


def _plot_families(rows: list[dict], path: Path) -> None:
    """Per family: pixel PSNR against the source image (VAE only, BDIA, Euler / DDIM inversion) and against the
    VAE-only reconstruction (the best any inversion can give), and the latent round trips' errors."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    names, width = [r["family"] for r in rows], 0.27

    def bars(ax, series: list[tuple[str, list[float]]]) -> None:
        for j, (label, values) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i in range(len(rows))], values, width, label=label)
        ax.set_xticks(range(len(rows)), names)
        ax.legend(fontsize=8)

    def approx(r: dict, ending: str) -> float:
        return next(v for k, v in r.items() if k.endswith(ending) and ("DDIM()" in k or "Euler()" in k))

    bars(
        axes[0],
        [
            ("VAE only (encode -> decode)", [r["PSNR VAE only (encode -> decode) dB"] for r in rows]),
            ("BDIA", [r["PSNR BDIA (invert -> sample -> decode) dB"] for r in rows]),
            ("Euler / DDIM inversion", [approx(r, "inversion dB") for r in rows]),
        ],
    )
    axes[0].set_ylabel("PSNR [dB]")
    axes[0].set_title("against the source image (random weights: the VAE is the limit)", fontsize=9)
    bars(
        axes[1],
        [
            ("BDIA", [r["PSNR BDIA vs VAE-only image dB"] for r in rows]),
            ("Euler / DDIM inversion", [approx(r, "inversion vs VAE-only image dB") for r in rows]),
        ],
    )
    axes[1].set_ylabel("PSNR [dB]")
    axes[1].set_title("against the VAE-only reconstruction (the ceiling)", fontsize=9)
    bars(
        axes[2],
        [
            ("BDIA float32", [r["image -> invert -> sample vs encode (float32)"] for r in rows]),
            ("BDIA float64", [r["image -> invert -> sample vs encode (float64)"] for r in rows]),
            ("Euler / DDIM inversion float32", [approx(r, "image -> sample vs encode (float32)") for r in rows]),
        ],
    )
    axes[2].set_yscale("log")
    axes[2].set_ylabel("relative L2 error of the latent")
    axes[2].set_title("image -> invert -> sample vs encode(image)", fontsize=9)
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


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    results_dir, img_dir = outputs(quick, results_dir, img_dir)  # (a quick run never writes the committed ones)
    with threads(1), torch.inference_mode():
        return _run(quick, results_dir, img_dir)


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
    defaults = {"SD 1.5": 50, "SDXL": 50, "SD3": 28, "Flux": 28}  # the pipelines' own num_inference_steps
    rows = [family(name, 5 if quick else defaults[name], 3 if quick else 31, 1 if quick else 3) for name in FAMILIES]
    for r in rows:
        print_table([{"measure": k, "value": v} for k, v in r.items()], f"{r['family']} (tiny pipeline)")
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot(step, e2e, img_dir / "diffusers_speed.png")
    _plot_families(rows, img_dir / "diffusers_families.png")
    payload = {
        "quick": quick,
        "subnormals_flushed_while_timing": True,
        "per_step": step,
        "per_step_tiny_latents": small,
        "end_to_end": e2e,
        "families": rows,
        "seconds": time.perf_counter() - t0,
    }
    save(results_dir, "diffusers", payload)
    return payload
