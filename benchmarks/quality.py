"""Sample quality on a trained network: the shipped digits model, judged by the shipped classifier, with intervals.

Every solver samples class-conditional 8x8 digits from the same noise (724 per run: the comparison half's 181
labels four times) at a few NFE budgets (the number of steps is the largest whose NFE fits: Heun-type solvers take
2 evaluations per step), with the plain conditional model and with classifier-free guidance 2. Each run is scored
by ``bdia.digits.metrics.DigitsJudge``: class accuracy and digits-FD (Frechet distance of the classifier's
penultimate features) to one half of the held-out real digits; the other half (181 digits) is the real-vs-real
floor. Each seed redraws the noise and the halving.

Intervals. Within a seed, a bootstrap over the 724 samples (the same resampled indices for every method, so
methods sharing the noise stay paired) gives a 95% interval of the FD, and of each method's FD difference to its
baseline (DDIM; Heun for BDIA over Heun). Over seeds, the seed-mean's interval comes from the mean of the seeds'
bootstrap draws (sample noise; percentile intervals shifted by the draws' mean bias, since FD on a resample with
repeats is biased upwards), and the spread over seeds (which also moves the reference half) is reported beside it.
A difference is called only where its interval excludes 0. The floor's 181 real digits carry a larger
small-sample bias than 724 samples do, so samples can score below it: compare methods with each other.

Grid: ``trailing`` spacing of the T = 1000 training times, ending at alpha = 1 (t = -1); float32 on one CPU thread.
"""

from __future__ import annotations

import base64
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bdia
from bdia import digits
from bdia.digits.metrics import DigitsJudge, frechet_distance
from bdia.models import CountNFE, Model
from bdia.solvers import BDIA, DDIM, OBELM, Euler, Heun
from benchmarks import IMG, outputs, print_table, pyplot, save

__all__ = ["methods", "run"]

GUIDANCE = {"conditional": None, "CFG 2": 2.0}
REPEAT = 4  # samples per run: the comparison half's labels this many times (4 x 181 = 724)
BOOT = 200  # bootstrap draws per seed


def methods(quick: bool = False) -> dict[str, tuple[Callable[[], Any], dict[str, tuple[int, ...]]]]:
    """Display name -> (solver factory, NFE budgets per guidance). The budgets are what the compute allowed (about
    30 minutes on one shared CPU core): BDIA at NFE 10, 20, 50 without guidance and 10, 20 with it; DDIM and both
    O-BELMs also at 100 without guidance and 50 with it; the Heun family at 10."""
    if quick:
        q = {"conditional": (5,)}
        return {"DDIM": (DDIM, q), "BDIA g=0.5": (lambda: BDIA(DDIM(), 0.5), q), "O-BELM": (OBELM, q)}
    one = {"conditional": (10, 20, 50), "CFG 2": (10, 20)}
    long = {"conditional": (10, 20, 50, 100), "CFG 2": (10, 20, 50)}
    heun = {"conditional": (10,), "CFG 2": (10,)}
    return {
        "DDIM": (DDIM, long),
        "BDIA g=0.5": (lambda: BDIA(DDIM(), 0.5), one),
        "BDIA g=1": (lambda: BDIA(DDIM(), 1.0), one),
        "O-BELM": (OBELM, long),
        "O-BELM bounded": (lambda: OBELM(max_root=1.0), long),
        "Heun": (Heun, heun),
        "BDIA-Heun g=0.5, Euler back": (lambda: BDIA(Heun(), 0.5, backward=Euler()), heun),
        "BDIA-Heun g=0.5, DDIM back": (lambda: BDIA(Heun(), 0.5, backward=DDIM()), heun),
        "BDIA-Heun g=0.5, Heun back": (lambda: BDIA(Heun(), 0.5, backward=Heun()), heun),
    }


def _grid(model: Model, nfe: int, nfe_per_step: int) -> torch.Tensor:
    # a Heun-type step costs nfe_per_step evaluations, except the last one to alpha = 1 (plain first-order step)
    steps = max(1, (nfe + 1) // nfe_per_step if nfe_per_step > 1 else nfe)
    # ending at alpha = 1 (t = -1, diffusers' set_alpha_to_one=True): the last step lands on x0_hat. Ending at
    # t = 0 instead ruins Heun in native time (docs/theory.md)
    return model.schedule.timesteps(steps, "trailing", set_alpha_to_one=True)


def _encode(images: torch.Tensor) -> str:
    """``(N, 1, 8, 8)`` images in [-1, 1] as base64 of 8-bit grey levels (compact in the JSON)."""
    q = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return base64.b64encode(bytes(q.flatten().tolist())).decode()


def _decode(text: str) -> torch.Tensor:
    q = torch.tensor(list(base64.b64decode(text)), dtype=torch.float32)
    return (q / 127.5 - 1).reshape(-1, 1, 8, 8)


def _sample(model: CountNFE, solver: Any, noise: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor):
    model.calls = 0
    with torch.no_grad():
        out = bdia.sample(model, noise, ts, solver, labels=labels)
    return out.x.clamp(-1, 1), model.calls


def run(
    quick: bool = False,
    results_dir: Path | None = None,
    img_dir: Path | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Measure, print, save ``quality.json`` (rewritten after every seed, so a cut-off run keeps its finished
    seeds) and plot. ``seeds`` overrides the default (0, 1, 2)."""
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    threads = torch.get_num_threads()
    # batches of 724 8x8 digits gain little from threads, and on a shared machine extra threads spin
    torch.set_num_threads(1)
    try:
        return _run(quick, Path(results_dir), Path(img_dir), seeds)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, results_dir: Path, img_dir: Path, seeds: tuple[int, ...] | None) -> dict[str, Any]:
    seeds = seeds or ((0,) if quick else (0, 1, 2))
    guidance = {"conditional": None} if quick else GUIDANCE
    repeat, boot = (1, 20) if quick else (REPEAT, BOOT)
    solvers = methods(quick)
    models = {g: CountNFE(digits.model(guidance=s)) for g, s in guidance.items()}
    classifier = digits.classifier()

    rows: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    grids: dict[str, dict[str, str]] = {g: {} for g in guidance}
    t_start = time.perf_counter()
    for seed in seeds:
        judge = DigitsJudge.split(seed, classifier)
        labels = judge.labels.repeat(repeat)
        if quick:
            labels = labels[::4]
        floor = judge.floor()
        floors.append({"seed": seed, "n": len(judge.labels), "accuracy": floor.accuracy, "fd": floor.fd})
        noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
        gen = torch.Generator().manual_seed(2000 + seed)
        idx = torch.randint(len(labels), (boot, len(labels)), generator=gen)  # shared by every method: paired
        show = torch.stack([torch.nonzero(labels == c).flatten()[0] for c in range(10)])
        for gname, model in models.items():
            boots: dict[tuple[str, int], list[float]] = {}
            for mname, (make, budgets) in solvers.items():
                for nfe in budgets.get(gname, ()):
                    solver = make()
                    ts = _grid(model.model, nfe, solver.nfe)
                    t0 = time.perf_counter()
                    x, used = _sample(model, solver, noise, ts, labels)
                    elapsed = time.perf_counter() - t0
                    sc = judge(x, labels)
                    feats = judge.features(x)
                    draws = [frechet_distance(feats[i], judge.reference_features) for i in idx]
                    boots[(mname, nfe)] = draws
                    if seed == seeds[0]:
                        grids[gname][f"{mname}|{nfe}"] = _encode(x[show])
                    rows.append(
                        {
                            "guidance": gname,
                            "method": mname,
                            "NFE budget": nfe,
                            "NFE": used,
                            "steps": len(ts) - 1,
                            "seed": seed,
                            "samples": len(labels),
                            "accuracy": sc.accuracy,
                            "fd": sc.fd,
                            "fd_boot": [round(d, 5) for d in draws],
                            "time [s]": elapsed,
                        }
                    )
                    print(f"seed {seed} {gname} {mname} NFE {used}: fd {sc.fd:.3f} acc {sc.accuracy:.3f} "
                          f"({elapsed:.1f} s)", flush=True)  # fmt: skip
        payload = {
            "quick": quick,
            "seeds": [f["seed"] for f in floors],
            "methods": {m: {g: list(b) for g, b in budgets.items()} for m, (_, budgets) in solvers.items()},
            "guidance": dict(guidance),
            "grid": "trailing, T=1000, ending at alpha = 1 (t = -1)",
            "samples per run": len(labels),
            "bootstrap draws per seed": boot,
            "floors": floors,
            "rows": rows,
            **_summarise(rows, floors),
            "grids": grids,
            "seconds": time.perf_counter() - t_start,
        }
        save(results_dir, "quality", payload)
    report(payload, img_dir)
    return payload


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _basic(point: float, draws: list[float]) -> tuple[float, float]:
    """A bias-corrected percentile 95% interval: the draws' 2.5% and 97.5% percentiles shifted by their mean's
    offset from the estimate. FD on a resample with repeated samples is biased upwards (fewer distinct samples),
    so the raw percentiles need not even contain the estimate."""
    b = statistics.fmean(draws) - point
    return _pct(draws, 0.025) - b, _pct(draws, 0.975) - b


def _baseline(method: str) -> str:
    """What a method's FD is compared with, pairwise: BDIA over Heun with Heun, everything else with DDIM."""
    return "Heun" if method.startswith("BDIA-Heun") else "DDIM"


def _summarise(rows: list[dict[str, Any]], floors: list[dict[str, Any]]) -> dict[str, Any]:
    order = list(dict.fromkeys(r["method"] for r in rows))
    keys = sorted(
        {(r["guidance"], r["method"], r["NFE budget"]) for r in rows}, key=lambda k: (k[0], order.index(k[1]), k[2])
    )
    by = {(r["guidance"], r["method"], r["NFE budget"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    stats, table = [], []
    for g, m, n in keys:
        sel = [by[(g, m, n, s)] for s in seeds if (g, m, n, s) in by]
        fd, acc = [r["fd"] for r in sel], [r["accuracy"] for r in sel]
        mean_draws = [statistics.fmean(d) for d in zip(*(r["fd_boot"] for r in sel), strict=True)]
        base = _baseline(m)
        ref = [by.get((g, base, n, r["seed"])) for r in sel]
        diff: dict[str, Any] = {}
        if m != base and all(ref):
            d_draws = [
                statistics.fmean(a - b for a, b in zip(col_m, col_d, strict=True))
                for col_m, col_d in zip(
                    zip(*(r["fd_boot"] for r in sel), strict=True),
                    zip(*(r["fd_boot"] for r in ref), strict=True),
                    strict=True,
                )
            ]
            d_point = statistics.fmean(a["fd"] - b["fd"] for a, b in zip(sel, ref, strict=True))
            lo, hi = _basic(d_point, d_draws)
            per_seed = [a["fd"] - b["fd"] for a, b in zip(sel, ref, strict=True)]
            verdict = "better" if hi < 0 else "worse" if lo > 0 else "not separated"
            diff = {"baseline": base, "vs_base": d_point, "vs_base_lo": lo, "vs_base_hi": hi,
                    "vs_base_seeds": per_seed, "verdict": verdict}  # fmt: skip
        s = {
            "guidance": g,
            "method": m,
            "NFE budget": n,
            "NFE": sel[0]["NFE"],
            "steps": sel[0]["steps"],
            "seeds": len(sel),
            "accuracy_mean": statistics.fmean(acc),
            "fd_mean": statistics.fmean(fd),
            "fd_lo": _basic(statistics.fmean(fd), mean_draws)[0],
            "fd_hi": _basic(statistics.fmean(fd), mean_draws)[1],
            "fd_seed_std": statistics.stdev(fd) if len(fd) > 1 else 0.0,
            **diff,
        }
        stats.append(s)
        table.append(
            {
                "guidance": g,
                "method": m,
                "NFE": s["NFE"],
                "accuracy": f"{s['accuracy_mean']:.3f}",
                "digits-FD [95% CI]": f"{s['fd_mean']:.2f} [{s['fd_lo']:.2f}, {s['fd_hi']:.2f}]",
                "seed std": f"{s['fd_seed_std']:.2f}",
                "vs": diff.get("baseline", ""),
                "FD difference [95% CI]": (
                    f"{diff['vs_base']:+.2f} [{diff['vs_base_lo']:+.2f}, {diff['vs_base_hi']:+.2f}]" if diff else ""
                ),
                "verdict": diff.get("verdict", ""),
            }
        )
    floor = {
        "n": floors[0]["n"],
        "fd_mean": statistics.fmean(f["fd"] for f in floors),
        "fd_std": statistics.stdev([f["fd"] for f in floors]) if len(floors) > 1 else 0.0,
        "accuracy_mean": statistics.fmean(f["accuracy"] for f in floors),
    }
    return {"table": table, "stats": stats, "floor": floor}


def report(payload: dict[str, Any], img_dir: Path = IMG) -> None:
    """Print the tables and draw the plots of a payload (from ``run`` or a saved ``quality.json``)."""
    fl, guidance, seeds = payload["floor"], list(payload["guidance"]), payload["seeds"]
    print(f"real vs real ({fl['n']} vs the reference half): FD {fl['fd_mean']:.2f} ± {fl['fd_std']:.2f}, "
          f"accuracy {fl['accuracy_mean']:.3f}")  # fmt: skip
    for gname in guidance:
        print_table(
            [r for r in payload["table"] if r["guidance"] == gname],
            title=f"Digits, {gname}: {payload['samples per run']} samples per run, {len(seeds)} seed(s)",
        )
    _plot(payload, guidance, img_dir / "digits_quality.png", payload["quick"], len(seeds))
    for gname in guidance:
        tag = gname.replace(" ", "").lower()
        images = {k: _decode(v) for k, v in payload["grids"][gname].items()}
        _plot_grid(images, img_dir / f"digits_samples_{tag}.png", gname)


def _plot(summary: dict[str, Any], guidance: list[str], path: Path, quick: bool, n_seeds: int) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(guidance), figsize=(6.5 * len(guidance), 4.8), squeeze=False)
    fl = summary["floor"]
    for j, g in enumerate(guidance):
        ax = axes[0, j]
        stats = [s for s in summary["stats"] if s["guidance"] == g]
        for k, m in enumerate(dict.fromkeys(s["method"] for s in stats)):
            sel = sorted((s for s in stats if s["method"] == m), key=lambda s: s["NFE"])
            x = [s["NFE"] * (1 + 0.015 * (k - 4)) for s in sel]  # a small offset keeps the bars apart
            y = [s["fd_mean"] for s in sel]
            err = [[s["fd_mean"] - s["fd_lo"] for s in sel], [s["fd_hi"] - s["fd_mean"] for s in sel]]
            ls = "--" if "Heun" in m else "-"
            ax.errorbar(x, y, err, label=m, marker="o", ms=3, capsize=2, lw=1.2, ls=ls)
        ax.axhline(fl["fd_mean"], color="k", ls=":", lw=1, label=f"real vs real ({fl['n']} digits)")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=f"{g}: digits-FD, mean of {n_seeds} seeds, 95% CI")
        ticks = sorted({s["NFE budget"] for s in stats})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(plt.matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3, which="both")
        ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    axes[0, -1].legend(fontsize=7)
    fig.suptitle("8x8 digits, shipped model: digits-FD vs NFE" + (" [quick]" if quick else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(grid: dict[str, torch.Tensor], path: Path, title: str) -> None:
    plt = pyplot()
    keys = list(grid)
    fig, axes = plt.subplots(len(keys), 1, figsize=(4.2, 0.5 * len(keys) + 0.8), squeeze=False)
    for i, k in enumerate(keys):
        ax = axes[i, 0]
        ax.imshow(digits.grid(grid[k], 10).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        m, n = k.split("|")
        ax.set_ylabel(f"{m}, NFE {n}", rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"Samples of 0..9 from the same noise ({title})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
