"""Accuracy vs NFE: every solver against a tight DOP853 solution of the probability-flow ODE.

Problems: analytic Gaussian mixtures (``bdia.models.GaussianMixture``; docs/theory.md), one low- and one
high-dimensional, whose exact denoiser makes the error purely the solver's. Grids: Stable Diffusion's
discrete schedule with diffusers' ``leading`` spacing (offset 1, ending at abar[0]) and the continuous VP
schedule on a uniform grid (a smooth grid). The error is the relative L2 distance, over the whole batch,
between a solver's sample and the reference solution started from the same latent.

The reference does not use the library: in scaled coordinates ``xbar = x/alpha``, ``sbar = sigma/alpha``
the mixture's probability-flow ODE is ``d xbar/d sbar = sum_k r_k(xbar, sbar) sbar (xbar - mu_k) / (s_k^2 +
sbar^2)`` for any schedule (alpha cancels from the posterior weights ``r_k``), integrated here with
scipy's DOP853 at rtol = atol = 1e-12 and checked against a run at 1e-10.

Orders are fitted on the 128-d problem, whose slopes do not depend on the mixture's draw; the 2-d problem is run
for two draws (seeds 0 and 1) to show how much a low-dimensional fit moves. EDICT is also run to 800 steps, where
its asymptotic order shows.

BDIA over EDM's Heun: on an EDM schedule and Karras grid, BDIA(Heun) with each backward-step choice (Euler, which
is DDIM on EDM, or Heun) and a gamma sweep, against Heun and BDIA(Euler): ODE error of samples and distance of
inverted data to the true latent.

Also a gamma x NFE heat map for BDIA-DDIM (the authors recommend gamma 0.5 at 10 steps and 1 at 40;
another group reported 0.1 as best on CIFAR-10): here measured as ODE error, not as FID.
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
from bdia.models import CountNFE, GaussianMixture
from bdia.report import relative_error
from bdia.schedules import EDM, VP, DiscreteVP, Schedule
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, DPMSolver2, Euler, Heun, ScaledHeun
from benchmarks import heatmap, loglog_slope, outputs, print_table, pyplot, save, threads

__all__ = ["PROBLEMS", "SETTINGS", "methods", "run", "solve_reference"]


def a_one_gamma(schedule: Schedule, t_prev: float, t: float, t_next: float) -> float:
    """The per-step gamma that puts BDIA-DDIM's parasitic root at -1 (``a = gamma alpha_prev/alpha_next = 1``):
    the centred leapfrog in scaled coordinates, ``xbar_next = xbar_prev - (sbar_prev - sbar_next) eps``."""
    return schedule.at(t_next).alpha / schedule.at(t_prev).alpha


def methods() -> dict[str, Callable[[], Any]]:
    """The solvers compared, by display name (factories: each run gets a fresh solver)."""
    return {
        "Euler": Euler,
        "DDIM": DDIM,
        "Heun": Heun,
        "BDIA g=0.5": lambda: BDIA(DDIM(), 0.5),
        "BDIA g=0.8": lambda: BDIA(DDIM(), 0.8),
        "BDIA g=1": lambda: BDIA(DDIM(), 1.0),
        "BDIA g_i: a=1": lambda: BDIA(DDIM(), a_one_gamma),
        "O-BELM": OBELM,
        "O-BELM bounded": lambda: OBELM(max_root=1.0),
        "EDICT p=0.93": EDICT,
        "EDICT p=0.93, alternate": lambda: EDICT(alternate=True),
        "ScaledHeun": ScaledHeun,
        "DPM-Solver-2": DPMSolver2,
        "BDIA-Heun g=1": lambda: BDIA(Heun(), 1.0),
        "BDIA-Heun g=0.5, Heun back": lambda: BDIA(Heun(), 0.5, backward=Heun()),
        "BDIA-ScaledHeun g=0.5": lambda: BDIA(ScaledHeun(), 0.5),
        "BDIA-DPM2 g=0.5": lambda: BDIA(DPMSolver2(), 0.5),
    }


SD = DiscreteVP.stable_diffusion()

# name -> (schedule, grid(n), the noisiest time any grid starts from)
SETTINGS: dict[str, tuple[Schedule, Callable[[int], torch.Tensor], float]] = {
    "SD leading": (SD, lambda n: SD.timesteps(n, "leading", steps_offset=1), 999.0),
    "VP uniform": (VP(), lambda n: VP().timesteps(n), 1.0),
}

# name -> (dim, components, std, batch, seed of the mixture's draw)
PROBLEMS: dict[str, tuple[int, int, float, int, int]] = {
    "GMM 2-d": (2, 8, 0.2, 256, 0),
    "GMM 2-d, seed 1": (2, 8, 0.2, 256, 1),
    "GMM 128-d": (128, 10, 0.3, 32, 0),
}


def _gmm_rhs(gmm: GaussianMixture, shape: tuple[int, int]) -> Callable[[float, np.ndarray], np.ndarray]:
    mu = gmm.means.numpy()  # (K, D)
    s2 = gmm.stds.numpy() ** 2  # (K,)
    logw = np.log(gmm.weights.numpy())
    D = mu.shape[1]

    def rhs(sbar: float, y: np.ndarray) -> np.ndarray:
        xb = y.reshape(shape)
        v = s2 + sbar * sbar  # (K,): variance of the scaled marginal's components
        diff = xb[:, None, :] - mu[None]  # (B, K, D)
        logits = logw - 0.5 * (diff * diff).sum(-1) / v - 0.5 * D * np.log(v)
        logits -= logits.max(axis=1, keepdims=True)
        r = np.exp(logits)
        r /= r.sum(axis=1, keepdims=True)
        return (r[..., None] * (sbar / v)[None, :, None] * diff).sum(1).reshape(-1)

    return rhs


def solve_reference(
    gmm: GaussianMixture, x: torch.Tensor, t_start: float, times: list[float], tol: float = 1e-12
) -> dict[float, torch.Tensor]:
    """The probability-flow ODE's solution from ``x`` at ``t_start`` at each of ``times`` (earlier, less noisy),
    in float64, by DOP853 in the scaled coordinates (dense output between its steps)."""
    from scipy.integrate import solve_ivp

    sch = gmm.schedule
    a0, _ = sch.alpha_sigma(t_start)
    s_start = sch.snr_sbar(t_start)
    s_eval = sorted({sch.snr_sbar(t) for t in times}, reverse=True)
    if s_eval[0] > s_start:
        raise ValueError("every time must be at or after t_start on the sampling walk")
    xb = (x.double() / a0).reshape(x.shape[0], -1)
    sol = solve_ivp(
        _gmm_rhs(gmm, tuple(xb.shape)),
        (s_start, s_eval[-1]),
        xb.numpy().reshape(-1),
        method="DOP853",
        t_eval=s_eval,
        rtol=tol,
        atol=tol,
    )
    if not sol.success:
        raise RuntimeError(f"reference solve failed: {sol.message}")
    at_sbar = {s: torch.from_numpy(sol.y[:, j].copy()).reshape(x.shape) for j, s in enumerate(sol.t)}
    return {t: sch.alpha_sigma(t)[0] * at_sbar[sch.snr_sbar(t)] for t in times}


def _case(problem: str, setting: str, ns: list[int], tol: float):
    dim, K, std, batch, seed = PROBLEMS[problem]
    schedule, grid_of, t_top = SETTINGS[setting]
    gmm = GaussianMixture.random(schedule, dim=dim, components=K, std=std, seed=seed)
    grids = {n: grid_of(n) for n in ns}
    g = torch.Generator().manual_seed(seed + 1)
    k = schedule.at(t_top)
    x_top = torch.randn(batch, dim, generator=g, dtype=torch.float64) * math.sqrt(k.alpha**2 + k.sigma**2)
    times = sorted({float(gr[0]) for gr in grids.values()} | {float(gr[-1]) for gr in grids.values()}, reverse=True)
    times = [t for t in times if t != t_top]
    ref = solve_reference(gmm, x_top, t_top, times, tol) if times else {}
    ref[t_top] = x_top
    return gmm, grids, ref


def _curves(problem: str, setting: str, ns: list[int], tol: float) -> tuple[list[dict], dict]:
    gmm, grids, ref = _case(problem, setting, ns, tol)
    model = CountNFE(gmm)
    rows = []
    for name, make in methods().items():
        for n, grid in grids.items():
            model.calls = 0
            out = bdia.sample(model, ref[float(grid[0])], grid, make())
            err = relative_error(out.x, ref[float(grid[-1])])
            rows.append(
                {"problem": problem, "grid": setting, "method": name, "steps": n, "NFE": model.calls, "error": err}
            )
    check = {}
    if len(ref) > 1:  # how far the reference itself is from a looser one: the floor of what we can measure
        x_top = ref[max(ref)]
        loose = solve_reference(gmm, x_top, max(ref), [min(ref)], tol * 100)
        check = {"reference_vs_100x_looser": relative_error(loose[min(ref)], ref[min(ref)])}
    return rows, check


def _orders(rows: list[dict], fit_points: int) -> list[dict]:
    out = []
    keys = sorted({(r["problem"], r["grid"]) for r in rows}, key=str)
    for problem, grid in keys:
        for name in methods():
            pts = sorted(
                (r["NFE"], r["error"]) for r in rows if (r["problem"], r["grid"], r["method"]) == (problem, grid, name)
            )
            tail = pts[-fit_points:]
            out.append(
                {
                    "problem": problem,
                    "grid": grid,
                    "method": name,
                    "order": -loglog_slope([p[0] for p in tail], [p[1] for p in tail]),
                    "NFE range": f"{tail[0][0]}-{tail[-1][0]}",
                    "error at ~10 NFE": min(pts, key=lambda p: abs(math.log(p[0] / 10)))[1],
                    "error at ~50 NFE": min(pts, key=lambda p: abs(math.log(p[0] / 50)))[1],
                }
            )
    return out


def _heatmap(problem: str, gammas: list[float], ns: list[int], tol: float) -> dict:
    gmm, grids, ref = _case(problem, "SD leading", ns, tol)
    err = [
        [
            relative_error(
                bdia.sample(gmm, ref[float(grids[n][0])], grids[n], BDIA(DDIM(), gm)).x, ref[float(grids[n][-1])]
            )
            for n in ns
        ]
        for gm in gammas
    ]
    best = {n: gammas[min(range(len(gammas)), key=lambda i: err[i][j])] for j, n in enumerate(ns)}
    return {"problem": problem, "gammas": gammas, "steps": ns, "error": err, "best_gamma": best}


def _plot_curves(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    panels = [(p, g) for p in PROBLEMS for g in SETTINGS if any((r["problem"], r["grid"]) == (p, g) for r in rows)]
    ncol = 2
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(11, 4.2 * nrow), squeeze=False)
    styles = {name: ("--" if "BDIA" in name or "O-BELM" in name else "-") for name in methods()}
    for k, (problem, grid) in enumerate(panels):
        ax = axes[k // ncol][k % ncol]
        for name in methods():
            pts = sorted(
                (r["NFE"], r["error"]) for r in rows if (r["problem"], r["grid"], r["method"]) == (problem, grid, name)
            )
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], styles[name], marker="o", ms=3, label=name)
        ax.set_title(f"{problem}, {grid}", fontsize=10)
        ax.set_xlabel("NFE")
        ax.set_ylabel("relative error vs DOP853 reference", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_heatmaps(maps: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps), figsize=(4.8 * len(maps), 4.2), squeeze=False)
    for ax, m in zip(axes[0], maps, strict=True):
        e = np.log10(np.array(m["error"]))
        best = [m["gammas"].index(m["best_gamma"][n]) for n in m["steps"]]
        labels = [[f"{e[i, j]:.1f}" for j in range(len(m["steps"]))] for i in range(len(m["gammas"]))]
        colors = [["r" if i == best[j] else "w" for j in range(len(m["steps"]))] for i in range(len(m["gammas"]))]
        title = f"BDIA-DDIM, {m['problem']}, SD leading:\nlog10 error (red: best gamma per N)"
        heatmap(ax, fig, e, m["steps"], m["gammas"], labels, colors, title, "steps (NFE)", cmap="viridis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _edict_long(quick: bool, tol: float) -> list[dict]:
    ns = [20, 40] if quick else [100, 200, 400, 800]
    gmm, grids, ref = _case("GMM 128-d", "VP uniform", ns, tol)
    out = []
    for name in ("EDICT p=0.93", "EDICT p=0.93, alternate"):
        solver = methods()[name]
        errs = [
            relative_error(bdia.sample(gmm, ref[float(grids[n][0])], grids[n], solver()).x, ref[float(grids[n][-1])])
            for n in ns
        ]
        out.append({"method": name, "steps": ns, "error": errs, "order": -loglog_slope(ns, errs)})
    return out


EDM_METHODS: dict[str, Callable[[float], Any]] = {
    "BDIA-Euler": lambda g: BDIA(Euler(), g),
    "BDIA-Heun, Euler back": lambda g: BDIA(Heun(), g, backward=Euler()),
    "BDIA-Heun, Heun back": lambda g: BDIA(Heun(), g, backward=Heun()),
}


def _edm(quick: bool, tol: float) -> dict:
    """BDIA over EDM's Heun. On EDM (alpha = 1) DDIM is Euler, so the backward choices are Euler and Heun."""
    sch = EDM()
    ns = [5, 9, 18] if quick else [5, 9, 18, 36, 72]
    gammas = [0.5, 1.0] if quick else [0.2, 0.3, 0.5, 0.8, 1.0]
    gmm = GaussianMixture.random(sch, dim=64, components=8, std=0.3, seed=3)
    batch = 8 if quick else 64
    z = torch.randn(batch, 64, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 80.0
    data = solve_reference(gmm, z, 80.0, [0.0], tol)[0.0]
    model = CountNFE(gmm)
    rows = []

    def measure(name: str, g: float | None, make: Callable[[], Any]) -> None:
        for n in ns:
            grid = sch.timesteps(n)
            model.calls = 0
            err = relative_error(bdia.sample(model, z, grid, make()).x, data)
            nfe = model.calls
            lat = math.nan
            if g is None or g > 0:
                inv = bdia.invert(gmm, data, grid, make(), max_amplification=math.inf)
                lat = relative_error(inv.x, z)
            rows.append({"method": name, "gamma": g, "steps": n, "NFE": nfe, "error": err, "inverted latent": lat})

    measure("Euler", None, Euler)
    measure("Heun", None, Heun)
    for name, make in EDM_METHODS.items():
        for g in gammas:
            measure(name, g, lambda make=make, g=g: make(g))
    return {"gammas": gammas, "steps": ns, "rows": rows, "note": "inverted latent: Euler and Heun are approximate"}


def _plot_edm(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, ax in zip(("error", "inverted latent"), axes, strict=True):
        for name in dict.fromkeys(r["method"] for r in rows):
            for g in dict.fromkeys(r["gamma"] for r in rows if r["method"] == name):
                if g not in (None, 0.3, 1.0):
                    continue
                pts = sorted((r["NFE"], r[key]) for r in rows if r["method"] == name and r["gamma"] == g)
                label = name if g is None else f"{name}, g={g:g}"
                ls = "-" if g is None else ("--" if g == 1.0 else ":")
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, label=label)
        ax.set(xlabel="NFE", title=f"EDM, GMM 64-d: {key} (relative L2)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    with threads(1):
        return _run(quick, Path(results_dir), Path(img_dir))


def _run(quick: bool, results_dir: Path, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    ns = [5, 10, 20] if quick else [5, 7, 10, 14, 20, 28, 40, 56, 80, 100]
    tol = 1e-11 if quick else 1e-12
    rows, checks = [], {}
    for problem in PROBLEMS:
        for setting in SETTINGS:
            r, c = _curves(problem, setting, ns, tol)
            rows += r
            checks[f"{problem}, {setting}"] = c
    orders = _orders(rows, fit_points=3 if quick else 4)
    print_table(orders, "Empirical order (slope over the largest NFEs) and error at about 10 and 50 NFE")
    gammas = [0.0, 0.5, 1.0] if quick else [round(0.1 * i, 1) for i in range(11)]
    hns = [5, 10] if quick else [5, 10, 20, 40, 80]
    maps = [_heatmap(problem, gammas, hns, tol) for problem in PROBLEMS]
    for m in maps:
        best = [{"steps": n, "best gamma": m["best_gamma"][n]} for n in hns]
        print_table(best, f"BDIA-DDIM, {m['problem']}, SD leading: gamma with the smallest ODE error")
    if not quick:  # an independent cross-check: the library's native-time reference (bdia.reference.solve)
        from bdia.reference import solve

        for problem in PROBLEMS:
            gmm, grids, ref = _case(problem, "VP uniform", [10], tol)
            grid = grids[10][[0, -1]]
            other = solve(gmm, ref[float(grid[0])], grid, rtol=tol * 10, atol=tol * 10)
            checks[f"{problem}, VP uniform"]["bdia.reference.solve_vs_this"] = relative_error(
                other, ref[float(grid[-1])]
            )
    print(f"reference self-checks: {checks}")
    edict_long = _edict_long(quick, tol)
    print_table(edict_long, "EDICT at many steps (GMM 128-d, VP uniform): the asymptotic order")
    edm = _edm(quick, tol)
    print_table(edm["rows"], "BDIA over EDM's Heun (GMM 64-d, EDM, Karras grid): error and inverted latent")
    img_dir = Path(img_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot_curves(rows, img_dir / "accuracy_vs_nfe.png")
    _plot_heatmaps(maps, img_dir / "accuracy_gamma_heatmap.png")
    _plot_edm(edm["rows"], img_dir / "accuracy_edm.png")
    payload = {
        "quick": quick,
        "reference": {"method": "scipy DOP853 in (xbar, sbar)", "rtol": tol, "atol": tol, "self_check": checks},
        "problems": {
            k: dict(zip(("dim", "components", "std", "batch", "seed"), v, strict=True)) for k, v in PROBLEMS.items()
        },
        "rows": rows,
        "orders": orders,
        "gamma_heatmaps": maps,
        "edict_long": edict_long,
        "edm": edm,
        "seconds": time.perf_counter() - t0,
    }
    save(results_dir, "accuracy", payload)
    return payload
