"""The main job, ``python -m bdia demo``: sample and round-trip with each inversion scheme, print a table.

``--model gmm``: an analytic Gaussian mixture (NOTES section 7) under Stable Diffusion's discrete schedule
(leading grid, ending at abar[0]); its exact denoiser makes the numbers about the solvers alone.
"""

from __future__ import annotations

import argparse
import time

import torch

import bdia
from bdia.models import CountNFE, GaussianMixture
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM


def gmm_methods():
    return {
        "DDIM inversion": DDIM(),
        "BDIA gamma=1": BDIA(DDIM(), gamma=1.0),
        "BDIA gamma=0.5": BDIA(DDIM(), gamma=0.5),
    }


def run_gmm(steps: int, batch: int, dim: int, dtype: torch.dtype, seed: int) -> list[dict]:
    schedule = DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    ts = schedule.timesteps(steps, "leading", steps_offset=1)
    model = CountNFE(GaussianMixture.random(schedule, dim=dim, components=8, std=0.2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    data = model.model.sample(batch, generator=g).to(dtype)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    rows = []
    for name, solver in gmm_methods().items():
        model.calls = 0
        t0 = time.perf_counter()
        out = bdia.sample(model, noise, ts, solver)
        nfe = model.calls
        back = bdia.invert(model, out, ts, solver)
        z = bdia.invert(model, data, ts, solver)
        rec = bdia.sample(model, z, ts, solver)
        elapsed = time.perf_counter() - t0
        rows.append(
            {
                "method": name,
                "NFE": nfe,
                "noise->sample->invert": rel(back.x, noise),
                "data->invert->sample": rel(rec.x, data),
                "time [s]": elapsed,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    keys = list(rows[0])
    cells = [[r[k] if isinstance(r[k], str | int) else f"{r[k]:.2e}" for k in keys] for r in rows]
    widths = [max(len(k), *(len(str(c[i])) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for c in cells:
        print("  ".join(str(v).ljust(w) for v, w in zip(c, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bdia demo", description=__doc__)
    p.add_argument("--model", choices=["gmm"], default="gmm")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    print(
        f"Gaussian mixture (8 components, dim {a.dim}), SD schedule, {a.steps} leading steps, {a.dtype}, "
        f"batch {a.batch}; relative round-trip errors (0 = exact), time for the four walks"
    )
    print_table(run_gmm(a.steps, a.batch, a.dim, dtype, a.seed))
    return 0
