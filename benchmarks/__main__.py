"""``python -m benchmarks [name ...] [--quick] [--results DIR] [--img DIR]``: run benchmarks, print their tables.

With no names, every registered benchmark runs in turn. To add one, write ``benchmarks/<name>.py`` with a
``run(quick, results_dir, img_dir) -> dict`` function (see ``benchmarks/__init__.py``) and add one line
to ``REGISTRY`` below.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

from benchmarks import IMG, RESULTS

# name -> module path; each module exposes run(quick: bool, results_dir: Path, img_dir: Path) -> dict
REGISTRY: dict[str, str] = {
    "accuracy": "benchmarks.accuracy",  # error vs NFE against a DOP853 reference; gamma x NFE heat map
    "inversion": "benchmarks.inversion",  # round trips vs N, gamma, dtype; inverted latents vs the true ones
    "rounding": "benchmarks.rounding",  # the amplification estimate a walk checks, against measured walks
    "speed": "benchmarks.speed",  # per-step overhead vs diffusers and a torch.add floor; end to end; memory
    "gradients": "benchmarks.gradients",  # gradient through sampling: peak memory and time vs N
    "quality": "benchmarks.quality",  # trained digits model: class accuracy and digits-FD vs NFE, with/without CFG
    "diffusers": "benchmarks.diffusers",  # per pipeline family (SD, SDXL, SD3, Flux): round trips, PSNR, step times
    "throughput": "benchmarks.throughput",  # bdia sample: samples/s at 1 and 2 processes, shard-writing share
    "trained": "benchmarks.trained",  # trained digits model: ODE error vs NFE against a fine solution; O-BELM's gamma
    "gpu": "benchmarks.gpu",  # CUDA tests, default path, a walk as a CUDA graph, SD 1.5's UNet in 3 dtypes
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("names", nargs="*", metavar="name", help=f"benchmarks to run (default: all of {list(REGISTRY)})")
    p.add_argument("--quick", action="store_true", help="a reduced grid that runs in seconds (numbers not for citing)")
    p.add_argument(
        "--results", type=Path, help=f"where the JSON results go (default {RESULTS}; --quick: a temp folder)"
    )
    p.add_argument("--device", help="where benchmarks that take one run (speed: cpu or cuda)")
    p.add_argument("--img", type=Path, help=f"where the PNG plots go (default {IMG}; --quick: a temp folder)")
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in REGISTRY]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(REGISTRY)}")
    for name in a.names or list(REGISTRY):
        t0 = time.perf_counter()
        print(f"\n=== {name}{' (quick)' if a.quick else ''} ===", flush=True)
        run = importlib.import_module(REGISTRY[name]).run
        kw = {} if a.device is None else {"device": a.device}
        if kw and "device" not in inspect.signature(run).parameters:
            p.error(f"benchmark {name!r} runs on the CPU only (no --device)")
        run(quick=a.quick, results_dir=a.results, img_dir=a.img, **kw)
        print(f"--- {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
