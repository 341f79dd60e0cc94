"""Benchmarks of the bdia solvers: accuracy, inversion, speed (and more, registered in ``benchmarks.__main__``).

Run ``python -m benchmarks [name ...] [--quick]``. Each benchmark module has one entry point,
``run(quick: bool = False, results_dir: Path = RESULTS, img_dir: Path = IMG) -> dict``, which prints its
table(s), writes ``<results_dir>/<name>.json`` and PNG plots ``<img_dir>/<name>_*.png`` and returns the
JSON payload. Quick mode (used by the test suite) runs a reduced grid in seconds; its numbers are not
the published ones. The helpers below are shared by every benchmark.
"""

from __future__ import annotations

import json
import math
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from bdia.report import fmt, format_table

__all__ = [
    "IMG",
    "RESULTS",
    "environment",
    "fmt",
    "interleaved",
    "loglog_slope",
    "outputs",
    "print_table",
    "pyplot",
    "save",
    "threads",
]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"


@contextmanager
def threads(n: int = 1) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore. One by default: on a small shared CPU, torch's thread pool
    turns a 70 us softmax on a (256, 8) tensor into 12 ms of spinning (measured on a shared 2-core CPU),
    and single-thread timings are the ones that compare fairly across machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def environment() -> dict[str, Any]:
    """What produced the numbers (stored with every result file)."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def outputs(quick: bool, results_dir: Path | None, img_dir: Path | None) -> tuple[Path, Path]:
    """Where a run writes: the folders given, else the committed ``RESULTS`` and ``IMG`` for a full run and a fresh
    temporary folder for a quick one (whose numbers are not for citing: it never overwrites the committed ones)."""
    if quick and (results_dir is None or img_dir is None):
        tmp = Path(tempfile.mkdtemp(prefix="bdia-bench-quick-"))
        print(f"(quick run: results and plots go to {tmp})")
        results_dir, img_dir = results_dir or tmp / "results", img_dir or tmp / "img"
    return Path(results_dir or RESULTS), Path(img_dir or IMG)


def save(results_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the environment) to ``results_dir/name.json``; non-finite floats become strings."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [clean(x) for x in v]
        return v

    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(clean({"benchmark": name, "environment": environment(), **payload}), indent=1) + "\n")
    return path


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Print rows (dicts with the same keys) as a markdown table (``bdia.report.format_table``); returns the text."""
    text = "\n" + format_table(rows, title)
    print(text, flush=True)
    return text


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (imported lazily: an optional dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(ax, fig, log_values, xs: Sequence, ys: Sequence, labels, colors, title: str, xlabel: str, **imshow) -> None:
    """An annotated gamma (rows) x N (columns) map of log10 values: one cell label and colour per cell."""
    im = ax.imshow(log_values, origin="lower", aspect="auto", **imshow)
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    for i in range(len(ys)):
        for j in range(len(xs)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=7, color=colors[i][j])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("gamma")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log(y) against log(x) (an empirical order is minus this for errors vs NFE)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0 and math.isfinite(y)]
    if len(pts) < 2:
        return math.nan
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, inner: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Wall time per call (seconds) of each function, measured round-robin so that drifts in machine load
    hit every candidate alike: ``repeats`` rounds, each timing ``inner`` back-to-back calls of each. Each round
    runs the candidates in a fresh random order (seeded by ``seed``): a candidate's time depends on the caches
    and the heap that the one before it left, and a fixed or merely rotated order (which keeps every
    candidate's predecessor) would charge that to the same candidate in every round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    order = random.Random(seed)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return times
