"""``python -m benchmarks gpu``: everything a CUDA device is needed for, in one command and one JSON (``gpu.json``).

1. The CUDA tests of the suite (``pytest -k cuda``: device placement, no host syncs in the step loop, exactness of
   the fixed-point mode with a convolutional network, the CUDA speed benchmark's quick mode).
2. The default call per step on the device against the hand-written loop and diffusers' ``DDIMScheduler.step``
   (``benchmarks.speed.default_path``), with the per-walk fixed cost.
3. A whole walk captured as one CUDA graph against the same walk run eagerly: a walk's plan makes every shape and
   coefficient static and leaves no host sync in the loop (``check_finite=False``: the final check is the one sync,
   and it is a host read), so ``bdia.sample`` can be captured as it is; the replay gives the eager walk's bits.
4. Stable Diffusion 1.5's UNet (its published configuration, random weights, built on the device) in float16,
   bfloat16 and float32: BDIA inversion round trips (noise -> sample -> invert, 50 leading steps), time per step and
   peak device memory.

It takes a few minutes on one GPU (under 8). Without CUDA it runs a dry mode on the CPU with tiny sizes (a tiny
UNet, no graph capture, the CUDA tests only collected), which the test suite runs to keep the command working; dry
results go to a temporary folder. diffusers is needed for sections 2 and 4 (``pip install "bdia[diffusers]"``, or
carry its wheel to a machine without a package index); without it those sections say they were skipped.
"""

from __future__ import annotations

import copy
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import bdia
from bdia.models import Model
from bdia.report import relative_error
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM
from benchmarks import ROOT, interleaved, outputs, print_table, save

__all__ = ["run", "sd15_unet_config"]

SD = DiscreteVP.stable_diffusion()


def sd15_unet_config(tiny: bool = False) -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet2DConditionModel configuration (its published unet/config.json), or a tiny one of
    the same shape for the dry mode."""
    if tiny:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
            norm_num_groups=4,
        )  # fmt: skip
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
        freq_shift=0,
    )  # fmt: skip


def _cuda_tests(dry: bool) -> dict:
    """The suite's CUDA tests in a subprocess (collected only, in the dry mode)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-k", "cuda", "-p", "no:cacheprovider", str(ROOT / "tests")]
    if dry:
        cmd.insert(4, "--collect-only")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "returncode": None, "summary": "timed out after 300 s"}
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    return {
        "command": " ".join(cmd[1:]),
        "returncode": r.returncode,
        "summary": lines[-1] if lines else r.stderr[-500:],
        "seconds": time.perf_counter() - t0,
    }


def _graph(device: str, shape: tuple[int, ...], steps: int, repeats: int) -> dict:
    """A BDIA walk over a small convolutional network, eager and replayed from one CUDA graph capture."""
    from benchmarks.speed import TinyConvNet

    net = TinyConvNet(shape[1]).to(device).eval().requires_grad_(False)
    model, solver = Model(net, SD, "epsilon"), BDIA(DDIM())
    grid = SD.timesteps(steps, "leading", steps_offset=1)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)

    def eager() -> bdia.State:
        return bdia.sample(model, x, grid, solver, check_finite=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs ask (this also makes the plan)
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = eager()
    graph.replay()
    torch.cuda.synchronize()
    reference = eager()
    same = bool(torch.equal(captured.x, reference.x) and torch.equal(captured.x_prev, reference.x_prev))

    def replay() -> None:
        graph.replay()
        torch.cuda.synchronize()

    def synced_eager() -> None:
        eager()
        torch.cuda.synchronize()

    times = interleaved({"eager walk": synced_eager, "CUDA graph replay": replay}, repeats, inner=3)
    med = {k: statistics.median(v) / steps * 1e6 for k, v in times.items()}
    rows = [{"walk": k, "us per step": v, "x eager": v / med["eager walk"]} for k, v in med.items()]
    return {"shape": list(shape), "steps": steps, "replay_equals_eager_bits": same, "rows": rows}


def _unet(device: str, dry: bool, steps: int) -> dict:
    """Round trips, time per step and peak memory of BDIA inversion through SD 1.5's UNet in three dtypes."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return {"skipped": "diffusers is not installed"}
    config = sd15_unet_config(tiny=dry)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        base = UNet2DConditionModel(**config).eval().requires_grad_(False)
    side = config["sample_size"]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, side, side, generator=g, dtype=torch.float64)
    text = torch.randn(1, 8 if dry else 77, config["cross_attention_dim"], generator=g)
    grid = SD.timesteps(steps, "leading", steps_offset=1)
    rows = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        if dry and dtype == torch.float16:
            continue  # (half-precision convolutions are a GPU's; the CPU dry mode checks the plumbing)
        unet = base if dtype == torch.float32 else torch.nn.Module.to(copy.deepcopy(base), dtype)
        cond = text.to(device, dtype)

        def net(x: torch.Tensor, t: torch.Tensor, unet=unet, cond=cond) -> torch.Tensor:
            return unet(x, t, encoder_hidden_states=cond).sample

        model, solver = Model(net, SD, "epsilon"), BDIA(DDIM())
        z = noise.to(device, dtype)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = bdia.sample(model, z, grid, solver, max_amplification=math.inf)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            back = bdia.invert(model, out, grid, solver, max_amplification=math.inf)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        t2 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        amp = solver.amplification(SD, grid.tolist(), False)
        rows.append(
            {
                "dtype": str(dtype).replace("torch.", ""),
                "round trip (noise -> sample -> invert)": relative_error(back.x, noise),
                "amplification estimate x eps": amp * torch.finfo(dtype).eps,
                "ms per step, sample": (t1 - t0) / steps * 1e3,
                "ms per step, invert": (t2 - t1) / steps * 1e3,
                "peak GiB": peak,
            }
        )
        del unet
    params = sum(p.numel() for p in base.parameters())
    return {"config": "tiny" if dry else "Stable Diffusion 1.5 UNet", "parameters": params, "steps": steps,
            "latent": [1, 4, side, side], "rows": rows}  # fmt: skip


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    cuda = torch.cuda.is_available()
    dry = quick or not cuda
    if not cuda:
        print("no CUDA device: the dry mode on the CPU (tiny sizes; nothing here is a GPU figure)")
    results_dir, _ = outputs(dry, results_dir, img_dir)
    device = "cuda" if cuda else "cpu"
    t0 = time.perf_counter()
    payload: dict[str, Any] = {"quick": dry, "dry": not cuda, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    payload["tests"] = _cuda_tests(dry=not cuda)
    print(f"CUDA tests: {payload['tests']['summary']}")
    try:
        from benchmarks.speed import default_path

        shapes = ((4, 4, 64, 64), (1, 16, 128, 128)) if not dry else ((1, 4, 8, 8),)
        payload["default_path"] = [
            default_path(repeats=31 if not dry else 2, shape=s, steps=(20, 50) if not dry else (3, 5), device=device)
            for s in shapes
        ]
        for d in payload["default_path"]:
            print_table(d["rows"], f"Default path per step on {payload['device']}, {d['shape']} float32")
            print_table(d["fixed"], f"Per-walk fixed cost on {payload['device']}, {d['shape']}")
    except ImportError:
        payload["default_path"] = {"skipped": "diffusers is not installed"}
    if cuda:
        payload["cuda_graph"] = _graph(device, (4, 4, 64, 64), steps=5 if dry else 50, repeats=5 if dry else 21)
        print_table(payload["cuda_graph"]["rows"], "A whole walk as one CUDA graph")
        print(f"replay equals the eager walk to the bit: {payload['cuda_graph']['replay_equals_eager_bits']}")
    else:
        payload["cuda_graph"] = {"skipped": "no CUDA device"}
    payload["sd15_unet"] = _unet(device, dry, steps=3 if dry else 50)
    if "rows" in payload["sd15_unet"]:
        print_table(payload["sd15_unet"]["rows"], f"BDIA inversion through {payload['sd15_unet']['config']}")
    payload["seconds"] = time.perf_counter() - t0
    save(results_dir, "gpu", payload)
    print(f"gpu: {payload['seconds']:.0f} s in all")
    return payload
