"""Sample quality on a trained network: the shipped digits model, judged by the shipped classifier.

Every solver samples class-conditional 8x8 digits from the same noise at NFE 5, 10, 20 and 50 (the number of
steps is the largest whose NFE fits the budget: Heun and EDICT take 2 evaluations per step), with the plain
conditional model and with classifier-free guidance. Each run is scored by ``bdia.digits.metrics.DigitsJudge``:
the class accuracy (does the classifier see the requested digit?) and the digits-FD (Frechet distance of
the classifier's penultimate features) to one half of the held-out real digits; the other half, scored the
same way with the same size and labels, is the real-vs-real floor. Each seed redraws the noise and the
halving, so the spread over seeds covers both. BDIA runs over a small gamma sweep; the best gamma per NFE
is the one with the lowest mean FD (picked on the same seeds, so mildly optimistic).

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
from bdia.digits.metrics import DigitsJudge
from bdia.models import CountNFE, Model
from bdia.solvers import BDIA, DDIM, Heun, obelm_gamma
from benchmarks import IMG, outputs, print_table, pyplot, save

__all__ = ["GAMMAS", "methods", "run"]

GAMMAS = (0.5, 0.8, 1.0)  # the BDIA sweep; gamma 0 is DDIM itself
GUIDANCE = {"conditional": None, "CFG 2": 2.0}


def _edict() -> Callable[[], Any] | None:
    edict = getattr(bdia.solvers, "EDICT", None)
    return None if edict is None else (lambda: edict(DDIM(), p=0.93))


def methods(quick: bool = False) -> dict[str, Callable[[], Any]]:
    """Display name -> solver factory (a fresh solver per run)."""
    gammas = (0.5, 1.0) if quick else GAMMAS
    out: dict[str, Callable[[], Any]] = {"DDIM": DDIM}
    if not quick:
        out["Heun"] = Heun
    for g in gammas:
        out[f"BDIA g={g:g}"] = lambda g=g: BDIA(DDIM(), gamma=g)
    if not quick:
        out["O-BELM"] = lambda: BDIA(DDIM(), gamma=obelm_gamma)
    if _edict() is not None:
        out["EDICT p=0.93"] = _edict()
    return out


def _grid(model: Model, nfe: int, nfe_per_step: int) -> torch.Tensor:
    steps = max(1, nfe // nfe_per_step)
    # ending at alpha = 1 (t = -1, diffusers' set_alpha_to_one=True): the last step lands on x0_hat. Ending at
    # t = 0 instead ruins Heun in native time: sigma(t) ~ sqrt(beta_0 (t + 1)) there, so the corrector's slope
    # at the end point is steep and the trapezoidal rule overshoots a long last step (docs/digits.md)
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
    # batches of 180 8x8 digits are too small to gain from threads, and on a shared machine extra threads spin
    torch.set_num_threads(1)
    try:
        return _run(quick, Path(results_dir), Path(img_dir), seeds)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, results_dir: Path, img_dir: Path, seeds: tuple[int, ...] | None) -> dict[str, Any]:
    nfes = (5,) if quick else (5, 10, 20, 50)
    seeds = seeds or ((0,) if quick else (0, 1, 2))
    guidance = {"conditional": None} if quick else GUIDANCE
    n_samples = 40 if quick else None  # None: the whole comparison half (180 digits)
    solvers = methods(quick)
    notes = [] if _edict() is not None else ["bdia.solvers.EDICT is missing: EDICT skipped"]
    models = {g: CountNFE(digits.model(guidance=s)) for g, s in guidance.items()}
    classifier = digits.classifier()

    rows: list[dict[str, Any]] = []
    floors: list[dict[str, Any]] = []
    grids: dict[str, dict[str, list]] = {g: {} for g in guidance}
    t_start = time.perf_counter()
    for seed in seeds:
        judge = DigitsJudge.split(seed, classifier)
        step = 1 if n_samples is None else max(1, len(judge.labels) // n_samples)
        labels, real = judge.labels[::step], judge.compare[::step]
        floor = judge(real, labels)
        floors.append({"seed": seed, "n": len(labels), "accuracy": floor.accuracy, "fd": floor.fd})
        noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(1000 + seed))
        # one digit of each class for the picture, all from this seed's noise
        show = torch.stack([torch.nonzero(labels == c).flatten()[0] for c in range(10)])
        for gname, model in models.items():
            for mname, make in solvers.items():
                for nfe in nfes:
                    solver = make()
                    ts = _grid(model.model, nfe, solver.nfe)
                    t0 = time.perf_counter()
                    x, used = _sample(model, solver, noise, ts, labels)
                    elapsed = time.perf_counter() - t0
                    sc = judge(x, labels)
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
                            "accuracy": sc.accuracy,
                            "fd": sc.fd,
                            "time [s]": elapsed,
                        }
                    )
        payload = {
            "quick": quick,
            "seeds": [f["seed"] for f in floors],
            "nfe": list(nfes),
            "methods": list(solvers),
            "guidance": dict(guidance),
            "grid": "trailing, T=1000, ending at alpha = 1 (t = -1)",
            "samples per run": len(labels),
            "notes": notes,
            "floors": floors,
            "rows": rows,
            **_summarise(rows, floors),
            "grids": grids,
            "seconds": time.perf_counter() - t_start,
        }
        save(results_dir, "quality", payload)
    report(payload, img_dir)
    return payload


def report(payload: dict[str, Any], img_dir: Path = IMG) -> None:
    """Print the tables and draw the plots of a payload (from ``run`` or a saved ``quality.json``)."""
    fl, guidance, seeds = payload["floor"], list(payload["guidance"]), payload["seeds"]
    print_table(
        [{"floor": "real vs real", "n": payload["floors"][0]["n"], "accuracy": fl["accuracy"], "fd": fl["fd"]}],
        title="Held-out half vs held-out half (mean ± std over seeds)",
    )
    for gname in guidance:
        print_table(
            [r for r in payload["table"] if r["guidance"] == gname],
            title=f"Digits, {gname}: class accuracy and digits-FD, mean ± std over {len(seeds)} seed(s)",
        )
    if not payload["quick"]:
        print_table(payload["best_gamma"], title="Best BDIA gamma per NFE (lowest mean FD; gamma 0 = DDIM)")
    for n in payload["notes"]:
        print("note:", n)
    nfes = tuple(payload["nfe"])
    _plot(payload, guidance, nfes, img_dir / "digits_quality.png", payload["quick"], len(seeds))
    for gname in guidance:
        tag = gname.replace(" ", "").lower()
        images = {k: _decode(v) for k, v in payload["grids"][gname].items()}
        _plot_grid(images, payload["methods"], nfes, img_dir / f"digits_samples_{tag}.png", gname)


def _fmt(values: list[float]) -> str:
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.3g}"
    return f"{m:.3g} ± {statistics.stdev(values):.2g}"


def _summarise(rows: list[dict[str, Any]], floors: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted({(r["guidance"], r["method"], r["NFE budget"]) for r in rows}, key=lambda k: (k[0], k[2]))
    order = list(dict.fromkeys(r["method"] for r in rows))
    keys.sort(key=lambda k: (k[0], order.index(k[1]), k[2]))
    table, stats = [], []
    for g, m, n in keys:
        sel = [r for r in rows if (r["guidance"], r["method"], r["NFE budget"]) == (g, m, n)]
        acc, fd = [r["accuracy"] for r in sel], [r["fd"] for r in sel]
        table.append(
            {
                "guidance": g,
                "method": m,
                "NFE": sel[0]["NFE"],
                "steps": sel[0]["steps"],
                "accuracy": _fmt(acc),
                "digits-FD": _fmt(fd),
            }
        )
        stats.append(
            {
                "guidance": g,
                "method": m,
                "NFE budget": n,
                "NFE": sel[0]["NFE"],
                "accuracy_mean": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "fd_mean": statistics.fmean(fd),
                "fd_std": statistics.stdev(fd) if len(fd) > 1 else 0.0,
            }
        )
    best = []
    for g in dict.fromkeys(r["guidance"] for r in rows):
        for n in sorted({r["NFE budget"] for r in rows}):
            cands = [
                s
                for s in stats
                if s["guidance"] == g
                and s["NFE budget"] == n
                and (s["method"].startswith("BDIA g=") or s["method"] == "DDIM")
            ]
            if cands:
                b = min(cands, key=lambda s: s["fd_mean"])
                gamma = 0.0 if b["method"] == "DDIM" else float(b["method"].split("=")[1])
                best.append(
                    {
                        "guidance": g,
                        "NFE": n,
                        "best gamma": gamma,
                        "digits-FD": f"{b['fd_mean']:.3g} ± {b['fd_std']:.2g}",
                        "accuracy": f"{b['accuracy_mean']:.3g}",
                    }
                )
    floor = {
        "accuracy": _fmt([f["accuracy"] for f in floors]),
        "fd": _fmt([f["fd"] for f in floors]),
        "fd_mean": statistics.fmean(f["fd"] for f in floors),
        "fd_std": statistics.stdev([f["fd"] for f in floors]) if len(floors) > 1 else 0.0,
        "accuracy_mean": statistics.fmean(f["accuracy"] for f in floors),
    }
    return {"table": table, "stats": stats, "best_gamma": best, "floor": floor}


def _plot(
    summary: dict[str, Any], guidance: list[str], nfes: tuple[int, ...], path: Path, quick: bool, n_seeds: int
) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, len(guidance), figsize=(5.5 * len(guidance), 7.5), squeeze=False)
    fl = summary["floor"]
    for j, g in enumerate(guidance):
        stats = [s for s in summary["stats"] if s["guidance"] == g]
        for m in dict.fromkeys(s["method"] for s in stats):
            sel = sorted((s for s in stats if s["method"] == m), key=lambda s: s["NFE budget"])
            x = [s["NFE budget"] for s in sel]
            style = {"marker": "o", "capsize": 3, "lw": 1.5 if not m.startswith("BDIA g=0.") else 1.0}
            if m.startswith("BDIA g=0.") and m not in ("BDIA g=0.5",):
                style["ls"] = ":"
            for i, (key, std) in enumerate((("fd_mean", "fd_std"), ("accuracy_mean", "accuracy_std"))):
                axes[i, j].errorbar(x, [s[key] for s in sel], [s[std] for s in sel], label=m, **style)
        ax = axes[0, j]
        ax.axhspan(fl["fd_mean"] - fl["fd_std"], fl["fd_mean"] + fl["fd_std"], color="k", alpha=0.12)
        ax.axhline(fl["fd_mean"], color="k", ls="--", lw=1, label="real vs real")
        ax.set(xscale="log", yscale="log", title=f"{g}: digits-FD (lower is better)", xlabel="NFE budget")
        lo, hi = ax.get_ylim()
        ax.set_yticks([t for t in (1, 1.5, 2, 3, 5, 10, 20, 50) if lo <= t <= hi])
        ax = axes[1, j]
        ax.axhline(fl["accuracy_mean"], color="k", ls="--", lw=1, label="real digits")
        ax.set(xscale="log", title=f"{g}: class accuracy", xlabel="NFE budget")
        for ax in axes[:, j]:
            ax.set_xticks(list(nfes), [str(n) for n in nfes])
            ax.minorticks_off()
            ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
            ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"8x8 digits, shipped model: quality vs NFE (mean ± std over {n_seeds} seeds)" + (" [quick]" if quick else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(grid: dict[str, torch.Tensor], names: list[str], nfes: tuple[int, ...], path: Path, title: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(
        len(names), len(nfes), figsize=(2.6 * len(nfes) + 1.2, 0.42 * len(names) + 0.8), squeeze=False
    )
    for i, m in enumerate(names):
        for j, n in enumerate(nfes):
            ax = axes[i, j]
            ax.imshow(digits.grid(grid[f"{m}|{n}"], 10).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"NFE {n}", fontsize=9)
            if j == 0:
                ax.set_ylabel(m, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Samples of 0..9 from the same noise ({title})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
