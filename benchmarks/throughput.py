"""Throughput of ``bdia sample`` on the shipped digits model: samples/s with 1 and 2 processes, and the cost of
writing shards (docs/scale.md).

Each run is the command line in a fresh process, as a user runs it, on the CPU with one thread per process:
``python -m bdia sample --model digits -n N --batch-size B --steps S`` and the same under
``python -m torch.distributed.run --standalone --nproc-per-node 2`` (gloo), alternated round by round so that
drifts in machine load hit both alike. samples/s is the sampling loop's rate as ``--stats`` reports it (from the
start barrier to the end barrier: process start-up and model loading excluded); the end-to-end wall time of each
command is given too, and CPU time (of the ranks in shards, and of the whole command with start-up): on a machine
shared with other jobs, samples/s is bounded by the cores left free, CPU time much less so. The writing share is
the time the ranks spent serialising, writing (with fsync) and renaming shards, over their time in shards. Every
run's files are checked to be the same bytes as the first run's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import IMG, RESULTS, ROOT, print_table, save

__all__ = ["run"]


def _command(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "bdia", "sample", *args]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [sys.executable, *launch, "-m", "bdia", "sample", *args]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def run(quick: bool = False, results_dir: Path = RESULTS, img_dir: Path = IMG) -> dict[str, Any]:
    num, batch, steps, repeats = (12, 6, 3, 1) if quick else (2000, 100, 50, 3)
    args = ["--model", "digits", "-n", str(num), "--batch-size", str(batch), "--steps", str(steps), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    reference: dict[str, bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="bdia-throughput-") as tmp:
        for r in range(repeats):
            for processes in (1, 2) if r % 2 == 0 else (2, 1):
                out, stats = Path(tmp) / f"run{r}-{processes}", Path(tmp) / f"stats{r}-{processes}.json"
                t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                done = subprocess.run(
                    _command(processes, [*args, "--out", str(out), "--stats", str(stats)]),
                    env=env,
                    capture_output=True,
                    text=True,
                )
                wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                if done.returncode != 0:
                    raise RuntimeError(f"bdia sample with {processes} process(es) failed:\n{done.stderr[-3000:]}")
                files = _files(out)
                reference = reference or files
                if files != reference:
                    raise RuntimeError(f"{processes} process(es) wrote other bytes than the first run")
                runs[processes].append({**json.loads(stats.read_text()), "end_to_end_s": wall, "cpu_s": cpu})
    rows = []
    for processes, rs in runs.items():
        rows.append(
            {
                "processes": processes,
                "samples/s (loop)": statistics.median(r["samples_per_s"] for r in rs),
                "loop s": statistics.median(r["seconds"] for r in rs),
                "end to end s": statistics.median(r["end_to_end_s"] for r in rs),
                "CPU s in shards": statistics.median(r["cpu_seconds"] for r in rs),
                "CPU s, whole command": statistics.median(r["cpu_s"] for r in rs),
                "writing share": statistics.median(r["write_share"] for r in rs),
            }
        )
    one, two = rows
    scaling = two["samples/s (loop)"] / one["samples/s (loop)"]
    end_to_end = one["end to end s"] / two["end to end s"]
    cores = {"os.cpu_count": os.cpu_count(), "usable": len(os.sched_getaffinity(0)), "load": os.getloadavg()}
    print_table(
        rows,
        f"bdia sample, digits model: {num} samples, shards of {batch}, {steps} steps, float32, CPU, one thread per "
        f"process; medians of {repeats} interleaved runs; {cores['usable']} usable cores",
    )
    print(f"scaling 2 vs 1 process: {scaling:.2f}x (loop), {end_to_end:.2f}x (end to end)")
    print(f"load average when done (other users' jobs included): {cores['load']}")
    payload = {
        "quick": quick,
        "settings": {"num": num, "batch_size": batch, "steps": steps, "repeats": repeats, "threads_per_process": 1},
        "cores": cores,
        "rows": rows,
        "scaling_loop": scaling,
        "scaling_end_to_end": end_to_end,
        "runs": {str(k): v for k, v in runs.items()},
        "identical_files": True,
    }
    save(results_dir, "throughput", payload)
    return payload
