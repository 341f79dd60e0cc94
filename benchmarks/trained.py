"""ODE accuracy on a trained network: every solver against a fine solution of the shipped digits model's flow.

The analytic mixtures (``benchmarks.accuracy``) give exact predictions; a trained network's errors are largest next
to clean data, where a solver's coefficients there matter most. Here the class-conditional digits model (no
guidance) is sampled from the same noise (100 digits, 10 of each class, float32, one thread) on ``trailing`` grids
ending at alpha = 1 (the quality benchmark's grid) at NFE 10 to 400, and each sample is compared with a fine
solution from the same noise: ``ScaledHeun`` over all 1,000 training times (1,999 NFE), cross-checked against
``DPMSolver2`` over the same grid. The distance is relative L2 over the batch.

Also: O-BELM's per-step gamma on these grids (the published formula's extrapolation near t = 0, and the bound of
``OBELM(max_root=1.0)``); BDIA over EDM's Heun with its three backward-step choices; and the native-time Heun's
failure on grids that end at t = 0 against the scaled-time integrators (class accuracy and digits-FD, 181 digits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bdia
from bdia import digits
from bdia.digits.metrics import DigitsJudge
from bdia.gamma import obelm_gamma
from bdia.models import CountNFE
from bdia.report import relative_error
from bdia.solvers import BDIA, DDIM, OBELM, DPMSolver2, Euler, Heun, ScaledHeun
from benchmarks import outputs, print_table, pyplot, save, threads

__all__ = ["methods", "run"]


def methods(quick: bool = False) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {
        "DDIM": DDIM,
        "BDIA g=0.5": lambda: BDIA(DDIM(), 0.5),
        "BDIA g=1": lambda: BDIA(DDIM(), 1.0),
        "O-BELM": OBELM,
        "O-BELM bounded": lambda: OBELM(max_root=1.0),
    }
    if quick:
        return out
    return {
        **out,
        "Heun": Heun,
        "ScaledHeun": ScaledHeun,
        "DPM-Solver-2": DPMSolver2,
        "BDIA-Heun g=0.5, Euler back": lambda: BDIA(Heun(), 0.5, backward=Euler()),
        "BDIA-Heun g=0.5, DDIM back": lambda: BDIA(Heun(), 0.5, backward=DDIM()),
        "BDIA-Heun g=0.5, Heun back": lambda: BDIA(Heun(), 0.5, backward=Heun()),
        "BDIA-ScaledHeun g=0.5, DDIM back": lambda: BDIA(ScaledHeun(), 0.5),
    }


def _steps(nfe: int, per_step: int) -> int:
    # a multi-stage step's last one to alpha = 1 is its first-order step (one evaluation fewer)
    return max(1, (nfe + 1) // per_step if per_step == 2 else nfe // per_step)


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    with threads(1):
        return _run(quick, Path(results_dir), Path(img_dir))


def _run(quick: bool, results_dir: Path, img_dir: Path) -> dict:
    t_start = time.perf_counter()
    model = CountNFE(digits.model(guidance=None))
    sch = model.schedule
    batch, fine = (20, 100) if quick else (100, 1000)
    nfes = [10, 20] if quick else [10, 20, 50, 100, 200, 400]
    labels = torch.arange(batch) % 10
    noise = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    kw = {"labels": labels, "max_amplification": math.inf}

    def walk(solver: Any, steps: int, end_to_one: bool = True) -> tuple[torch.Tensor, int]:
        model.calls = 0
        ts = sch.timesteps(steps, "trailing", set_alpha_to_one=end_to_one)
        with torch.no_grad():
            return bdia.sample(model, noise, ts, solver, **kw).x, model.calls

    ref, ref_nfe = walk(ScaledHeun(), fine)
    check = {
        "DPM-Solver-2": relative_error(walk(DPMSolver2(), fine)[0], ref),
        "DDIM": relative_error(walk(DDIM(), fine)[0], ref),
    }
    print(f"reference: ScaledHeun, {fine} steps ({ref_nfe} NFE); same grid: {check}", flush=True)

    rows = []
    for name, make in methods(quick).items():
        per = make().nfe
        for nfe in nfes:
            if per > 1 and nfe > 200:
                continue  # the budget: multi-stage solvers up to 200 NFE
            x, used = walk(make(), _steps(nfe, per))
            rows.append({"method": name, "NFE budget": nfe, "NFE": used, "error": relative_error(x, ref)})
            print(f"{name} NFE {used}: {rows[-1]['error']:.4g}", flush=True)
    table = []
    for name in methods(quick):
        row: dict[str, Any] = {"method": name}
        for r in rows:
            if r["method"] == name:
                row[str(r["NFE budget"])] = f"{r['error']:.3g}" + (
                    "" if r["NFE"] == r["NFE budget"] else f" ({r['NFE']})"
                )
        table.append(row)
    print_table(table, "Relative distance to the fine solution by NFE budget (NFE used in brackets where it differs)")

    gammas = []
    for n in [10, 20, 50, 100, 200, 400][: len(nfes) + 2 if quick else None]:
        ts = sch.timesteps(n, "trailing", set_alpha_to_one=True).tolist()
        g = [obelm_gamma(sch, a, b, c) for a, b, c in zip(ts, ts[1:], ts[2:], strict=False)]
        b = [OBELM(max_root=1.0).gamma.at(sch, a, b_, c, None) for a, b_, c in zip(ts, ts[1:], ts[2:], strict=False)]
        gammas.append(
            {
                "steps": n,
                "max published gamma": max(g),
                "its step (t -> t_next)": f"{ts[g.index(max(g)) + 1]:g} -> {ts[g.index(max(g)) + 2]:g}",
                "published, last 3": [round(v, 3) for v in g[-3:]],
                "bounded, last 3": [round(v, 3) for v in b[-3:]],
                "steps changed by the bound": sum(x != y for x, y in zip(g, b, strict=True)),
            }
        )
    print_table(gammas, "O-BELM's per-step gamma on trailing grids ending at alpha = 1")

    judge = DigitsJudge.split(0)
    ends = []
    ten = 4 if quick else 10
    for name, make in (("DDIM", DDIM), ("Heun", Heun), ("ScaledHeun", ScaledHeun), ("DPM-Solver-2", DPMSolver2)):
        for to_one in (False, True):
            model.calls = 0
            ts = sch.timesteps(ten if make().nfe == 1 else ten // 2, "trailing", set_alpha_to_one=to_one)
            with torch.no_grad():
                x = bdia.sample(model, torch.randn(len(judge.labels), 1, 8, 8,
                                generator=torch.Generator().manual_seed(8)), ts, make(),
                                labels=judge.labels).x.clamp(-1, 1)  # fmt: skip
            sc = judge(x, judge.labels)
            ends.append({"method": name, "grid end": "alpha = 1" if to_one else "t = 0", "NFE": model.calls,
                         "accuracy": sc.accuracy, "digits-FD": sc.fd})  # fmt: skip
    print_table(ends, f"About {ten} NFE, trailing grids ending at t = 0 or at alpha = 1 (181 digits, seed 0)")

    img_dir.mkdir(parents=True, exist_ok=True)
    _plot(rows, methods(quick), img_dir / "trained_accuracy.png")
    payload = {
        "quick": quick,
        "problem": {
            "model": "shipped digits model, conditional, no guidance",
            "batch": batch,
            "dtype": "float32",
            "grid": "trailing, ending at alpha = 1",
        },
        "reference": {"solver": "ScaledHeun", "steps": fine, "NFE": ref_nfe, "distance of other fine solutions": check},
        "rows": rows,
        "obelm_gamma": gammas,
        "grid_ends": ends,
        "seconds": time.perf_counter() - t_start,
    }
    save(results_dir, "trained", payload)
    return payload


def _plot(rows: list[dict], names: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        pts = sorted((r["NFE"], r["error"]) for r in rows if r["method"] == name)
        ls = ":" if "Heun" in name or "DPM" in name else "-"
        ax.loglog([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", ms=3, label=name)
    ax.set(xlabel="NFE", ylabel="relative distance to the fine solution",
           title="Shipped digits model (no guidance): ODE error vs NFE")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
