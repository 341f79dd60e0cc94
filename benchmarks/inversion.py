"""Inversion: round-trip errors vs N, gamma and dtype; inverted latents vs the true ones.

Problem: an analytic 64-d Gaussian mixture under Stable Diffusion's schedule, leading grid (offset 1, ending
at abar[0]). The true latent of each data point is known: the data are made by solving the probability-flow
ODE exactly (DOP853, ``benchmarks.accuracy.solve_reference``) from Gaussian noise at t = 999, so the latent
at any grid's first time is that reference trajectory there. For each solver, N and dtype:

- noise -> sample -> invert: sample from the true latent, invert the returned state; distance to the latent;
- data -> invert -> sample: invert the data (one plain step makes the first pair: the only approximation of
  BDIA and O-BELM; EDICT starts both copies on the data), sample back; distance to the data;
- the inverted latent of the data: its distance to the true latent, and its standard deviation (noise has 1).

"DDIM inversion" is ``DDIMInverse`` (the model evaluated at each inversion step's destination, as diffusers'
``DDIMInverseScheduler`` and null-text inversion run it); "eps at start" is ``DDIM().unstep``. Sampling is DDIM for
both. All distances are relative L2 over the batch, computed in float64; "inf" means the walk overflowed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bdia
from bdia.models import GaussianMixture
from bdia.report import relative_error
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, DDIMInverse
from benchmarks import heatmap, outputs, print_table, pyplot, save, threads
from benchmarks.accuracy import SD, solve_reference

__all__ = ["methods", "run"]

CLIP = 1e4  # plots show larger errors (and overflow) at this line

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def methods() -> dict[str, Callable[[], Any]]:
    return {
        "DDIM inversion": DDIMInverse,  # as diffusers' DDIMInverseScheduler and null-text inversion run it
        "DDIM inversion, eps at start": DDIM,  # Song et al.'s: the model at the step's start
        "BDIA g=1": lambda: BDIA(DDIM(), 1.0),
        "BDIA g=0.94": lambda: BDIA(DDIM(), 0.94),
        "BDIA g=0.8": lambda: BDIA(DDIM(), 0.8),
        "BDIA g=0.5": lambda: BDIA(DDIM(), 0.5),
        "O-BELM": OBELM,
        "O-BELM bounded": lambda: OBELM(max_root=1.0),
        "EDICT p=0.93": EDICT,
        "EDICT p=0.93, alternate": lambda: EDICT(alternate=True),
    }


def _std(x: torch.Tensor) -> float:
    s = float(x.double().std())
    return s if math.isfinite(s) else math.inf


def _problem(ns: list[int], batch: int, tol: float):
    gmm = GaussianMixture.random(SD, dim=64, components=8, std=0.3, seed=3)
    grids = {n: SD.timesteps(n, "leading", steps_offset=1) for n in ns}
    z = torch.randn(batch, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    starts = sorted({float(g[0]) for g in grids.values()}, reverse=True)
    ref = solve_reference(gmm, z, 999.0, [*starts, 0.0], tol)
    return gmm, grids, ref


def _walks(gmm, grid, solver, latent: torch.Tensor, data: torch.Tensor) -> dict[str, float]:
    # the benchmark measures the failures the default amplification bound refuses, so it lifts the bound
    kw = {"check_finite": False, "max_amplification": math.inf}
    out = bdia.sample(gmm, latent, grid, solver, **kw)
    back = bdia.invert(gmm, out, grid, solver, **kw)
    inv = bdia.invert(gmm, data, grid, solver, **kw)
    rec = bdia.sample(gmm, inv, grid, solver, **kw)
    return {
        "noise->sample->invert": relative_error(back.x, latent),
        "data->invert->sample": relative_error(rec.x, data),
        "inverted latent vs true": relative_error(inv.x, latent),
        "inverted latent std": _std(inv.x),
    }


def _plot_roundtrips(rows: list[dict], ns: list[int], dtypes: list[str], path: Path) -> None:
    plt = pyplot()
    keys = ["noise->sample->invert", "data->invert->sample"]
    fig, axes = plt.subplots(len(keys), len(dtypes), figsize=(3.6 * len(dtypes), 6.4), squeeze=False, sharey="row")
    for i, key in enumerate(keys):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            for name in methods():
                ys = [next(r[key] for r in rows if (r["method"], r["N"], r["dtype"]) == (name, n, dt)) for n in ns]
                ys = [min(y, CLIP) for y in ys]  # overflow (inf) and blow-ups are drawn at the clip line
                ax.semilogy(ns, ys, marker="o", ms=3, label=name)
            eps = torch.finfo(DTYPES[dt]).eps
            ax.axhline(eps, color="k", lw=0.6, ls=":")
            ax.axhline(CLIP, color="r", lw=0.6, ls="--")
            ax.set_ylim(1e-17, CLIP * 30)
            ax.set_title(f"{dt}: {key}", fontsize=9)
            ax.set_xscale("log")
            ax.set_xlabel("N (steps)")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].set_ylabel(f"relative error (dotted: dtype eps;\nred: >= {CLIP:g} or overflow)", fontsize=8)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_latents(rows: list[dict], ns: list[int], dtype: str, true_std: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8))
    for name in methods():
        pick = [next(r for r in rows if (r["method"], r["N"], r["dtype"]) == (name, n, dtype)) for n in ns]
        axes[0].loglog(ns, [min(p["inverted latent vs true"], CLIP) for p in pick], marker="o", ms=3, label=name)
        axes[1].semilogx(ns, [min(p["inverted latent std"], 10.0) for p in pick], marker="o", ms=3, label=name)
    axes[1].axhline(true_std, color="k", lw=0.8, ls=":", label="true latent")
    axes[0].set_title(f"inverted latent of the data vs the true latent ({dtype}; clipped at {CLIP:g})", fontsize=9)
    axes[1].set_title(f"std of the inverted latent ({dtype}; clipped at 10)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("N (steps)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative error")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_heat(maps: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.8 * len(maps), 4.0), squeeze=False)
    for ax, (dt, m) in zip(axes[0], maps.items(), strict=True):
        raw = np.array(m["error"], dtype=float)
        e = np.log10(np.clip(raw, 1e-17, 1e30))
        n_g, n_n = len(m["gammas"]), len(m["N"])
        labels = [
            [f"{e[i, j]:.0f}" if raw[i, j] < 1e30 else ("inf" if np.isinf(raw[i, j]) else ">30") for j in range(n_n)]
            for i in range(n_g)
        ]
        title = f"BDIA-DDIM noise->sample->invert, {dt}:\nlog10 relative error"
        heatmap(
            ax,
            fig,
            e,
            m["N"],
            m["gammas"],
            labels,
            [["c"] * n_n] * n_g,
            title,
            "N (steps)",
            cmap="magma",
            vmin=-16,
            vmax=4,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    with threads(1):
        return _run(quick, Path(results_dir), Path(img_dir))


def _run(quick: bool, results_dir: Path, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    ns = [5, 10] if quick else [10, 20, 50, 100, 200]
    dtypes = ["bfloat16", "float64"] if quick else list(DTYPES)
    batch = 8 if quick else 64
    gmm, grids, ref = _problem(ns, batch, 1e-9 if quick else 1e-12)
    data64 = ref[0.0]
    rows = []
    for dt in dtypes:
        dtype = DTYPES[dt]
        data = data64.to(dtype)
        for n in ns:
            latent = ref[float(grids[n][0])].to(dtype)
            for name, make in methods().items():
                rows.append({"method": name, "N": n, "dtype": dt, **_walks(gmm, grids[n], make(), latent, data)})
    n_show = 50 if 50 in ns else ns[-1]
    for key in ("noise->sample->invert", "data->invert->sample", "inverted latent vs true", "inverted latent std"):
        table = [
            {
                "method": name,
                **{
                    dt: next(r[key] for r in rows if (r["method"], r["N"], r["dtype"]) == (name, n_show, dt))
                    for dt in dtypes
                },
            }
            for name in methods()
        ]
        print_table(table, f"{key}, N = {n_show} (relative L2 error; std: of the latent)")
    true_std = {n: _std(ref[float(grids[n][0])]) for n in ns}
    print(f"std of the true latents: {true_std}")

    gammas = [0.5, 1.0] if quick else [0.3, 0.5, 0.7, 0.8, 0.9, 0.94, 0.97, 1.0]
    maps = {}
    for dt in ("float32", "float64"):
        err = []
        for g in gammas:
            solver = BDIA(DDIM(), g)
            line = []
            for n in ns:
                latent = ref[float(grids[n][0])].to(DTYPES[dt])
                out = bdia.sample(gmm, latent, grids[n], solver, check_finite=False)
                back = bdia.invert(gmm, out, grids[n], solver, check_finite=False, max_amplification=math.inf)
                line.append(relative_error(back.x, latent))
            err.append(line)
        maps[dt] = {"gammas": gammas, "N": ns, "error": err}
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot_roundtrips(rows, ns, dtypes, img_dir / "inversion_roundtrip.png")
    _plot_latents(rows, ns, "float64", true_std[n_show], img_dir / "inversion_latent.png")
    _plot_heat(maps, img_dir / "inversion_gamma_heatmap.png")
    payload = {
        "quick": quick,
        "problem": {"mixture": "64-d, 8 components, std 0.3", "batch": batch, "grid": "SD leading, offset 1"},
        "true_latent_std": true_std,
        "rows": rows,
        "gamma_maps": maps,
        "seconds": time.perf_counter() - t0,
    }
    save(results_dir, "inversion", payload)
    return payload
