"""Gradients through sampling: peak memory and time versus the number of steps N.

A loss on the final sample of a small convolutional epsilon-network (Stable Diffusion's discrete schedule,
trailing grid), differentiated with respect to the starting noise and the network's parameters by:
plain autograd through the unrolled loop; per-step gradient checkpointing (``sample_with_grad`` with
``checkpoint_every=1``: every state kept, one step's graph at a time); the reversible walk
(``sample_with_grad`` with BDIA gamma = 1); the reversible walk in exact mode at gamma = 0.5; and the reversible
walk for the latent alone, with the network frozen (guidance by gradient, editing by optimising the noise).

Cost model: with ``a`` the time of one evaluation of the network without autograd and ``b`` that of one evaluation
recorded by autograd plus its vector-Jacobian product (``b_x`` when only the input's gradient is wanted), one
sampling pass costs ``N a``; plain autograd at least ``N b``; per-step checkpointing and the reversible walk at least
``N (a + b)`` (the forward pass, then per step one recorded evaluation and its VJP); the exact mode ``N (2a + b)``
(its rebuild runs without autograd, so that the integers see the forward pass's bits). Each row reports its
method's bound in units of one sampling pass, measured on the same network in the same process.

Memory: on CPU the process's resident-set high-water mark (``getrusage``, tracked by the kernel, so no
peak is missed) above its level just before the first forward + backward, each configuration in a fresh
interpreter; on CUDA ``torch.cuda.max_memory_allocated`` above the allocated level before the run.
Time: best time of forward + backward over the repeats, and its ratio to one sampling pass without
autograd (same N and solver); on CPU the process's CPU time (one thread), since wall time on a shared
machine measures the neighbours' load; on CUDA wall time after synchronising. The gradient's relative
distance from plain autograd through the same float map (the exact mode: its surrogate) is reported
too. Quick mode runs everything in one process: its memory column is then not meaningful.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

import bdia
from bdia.exact import Exact
from bdia.gradients import sample_with_grad
from bdia.models import Model
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM
from benchmarks import ROOT, outputs, print_table, pyplot, save

__all__ = ["run"]


class ConvNet(torch.nn.Module):
    """Three 3x3 convolutions with a time input: activations of a few MB per step at 32x32."""

    def __init__(self, channels: int = 4, width: int = 48):
        super().__init__()
        self.a = torch.nn.Conv2d(channels + 1, width, 3, padding=1)
        self.b = torch.nn.Conv2d(width, width, 3, padding=1)
        self.c = torch.nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = (t / 1000).reshape(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:]).to(x.dtype)
        h = torch.nn.functional.silu(self.a(torch.cat([x, tt], 1)))
        h = torch.nn.functional.silu(self.b(h))
        return 0.1 * self.c(h)


def _maxrss() -> int:
    """The process's resident-set high-water mark in bytes (Linux reports KiB), tracked by the kernel."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Method(NamedTuple):
    """A way to differentiate through sampling: the solver it walks with, how it walks, its cost-model bound
    (in sampling passes, from a, b, b_x), and whether the network is frozen (gradients for the noise alone)."""

    solver: Callable[[], Any]
    walk: Callable[..., Any]  # (model, x, ts, solver) -> State
    bound: Callable[[float, float, float], float]
    frozen: bool = False


def _methods() -> dict[str, _Method]:
    bdia1, exact = (lambda: BDIA(DDIM(), 1.0)), (lambda: Exact(BDIA(DDIM(), 0.5)))
    return {
        "plain autograd": _Method(
            bdia1, lambda m, x, ts, s: bdia.sample(m, x, ts, s, check_finite=False, grad=True), lambda a, b, b_x: b / a
        ),
        "checkpoint per step": _Method(
            bdia1, lambda m, x, ts, s: sample_with_grad(m, x, ts, s, checkpoint_every=1), lambda a, b, b_x: 1 + b / a
        ),
        "reversible (gamma=1)": _Method(bdia1, sample_with_grad, lambda a, b, b_x: 1 + b / a),
        "reversible exact (gamma=0.5)": _Method(exact, sample_with_grad, lambda a, b, b_x: 2 + b / a),
        # the network frozen: gradients for the starting noise alone
        "reversible, latent only (gamma=1)": _Method(
            bdia1, sample_with_grad, lambda a, b, b_x: 1 + b_x / a, frozen=True
        ),
    }


def _eval_costs(net: torch.nn.Module, x: torch.Tensor, clock, device: torch.device, reps: int = 20):
    """Best per-evaluation times: without autograd (a), recorded plus its VJP for the input and the weights (b),
    and for the input alone (b_x)."""
    t = torch.full((x.shape[0],), 500.0, device=device)
    params = [p for p in net.parameters() if p.requires_grad]

    def timed(fn) -> float:
        fn()  # warm-up
        best = float("inf")
        for _ in range(3):
            _sync(device)
            t0 = clock()
            for _ in range(reps):
                fn()
            _sync(device)
            best = min(best, (clock() - t0) / reps)
        return best

    def plain() -> None:
        with torch.no_grad():
            net(x, t)

    def vjp(wrt: list[torch.Tensor]):
        def fn() -> None:
            z = x.detach().requires_grad_()
            y = net(z, t)
            torch.autograd.grad(y, [z, *wrt], torch.ones_like(y))

        return fn

    return timed(plain), timed(vjp(params)), timed(vjp([]))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one(name: str, n: int, size: int, batch: int, device_name: str, repeats: int) -> dict[str, Any]:
    """One method at one N: peak memory of its first forward + backward (from the pre-run level), its best
    time over ``repeats``, the best time of one sampling pass without autograd, and its gradient's distance
    from plain autograd through the same float map. Run it in a fresh process for a clean high-water mark."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    method = _methods()[name]
    net = ConvNet().to(device).requires_grad_(not method.frozen)
    schedule = DiscreteVP.stable_diffusion()
    model = Model(net, schedule)
    ts = schedule.timesteps(n, "trailing")
    noise = torch.randn(batch, 4, size, size, device=device)
    target = torch.randn_like(noise)
    # CPU time of this (single-threaded) process: wall time on a shared machine measures the neighbours
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else _maxrss()
    times, grad = [], None
    for _ in range(repeats):
        x = noise.clone().requires_grad_()
        t0 = clock()
        out = method.walk(model, x, ts, method.solver())
        ((out.x - target) ** 2).mean().backward()
        _sync(device)
        times.append(clock() - t0)
        if grad is None:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _maxrss()) - base
        grad = x.grad.detach().clone()
        del out, x
        net.zero_grad(set_to_none=True)
    fwd = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = clock()
            bdia.sample(model, noise, ts, method.solver(), check_finite=False)
            _sync(device)
            fwd.append(clock() - t0)
    a, b, b_x = _eval_costs(net, noise, clock, device)
    solver = method.solver()
    x = noise.clone().requires_grad_()
    ref = bdia.sample(model, x, ts, solver.surrogate if isinstance(solver, Exact) else solver, grad=True)
    ((ref.x - target) ** 2).mean().backward()
    return {
        "method": name,
        "N": n,
        "peak MB": peak / 2**20,
        "time [s]": min(times),
        "forward pass [s]": min(fwd),
        "(fwd+bwd) / forward pass": min(times) / min(fwd),
        "method's bound": method.bound(a, b, b_x),
        "b / a": b / a,  # one recorded evaluation and its VJP (input and weights), in evaluations without autograd
        "b_x / a": b_x / a,  # the same for the input's gradient alone
        "grad vs plain autograd (rel)": float((grad - x.grad).norm() / x.grad.norm()),
    }


def measure(ns: list[int], size: int, batch: int, device: torch.device, repeats: int, fresh: bool) -> list[dict]:
    rows = []
    for name in _methods():
        for n in ns:
            if fresh:  # a fresh interpreter per configuration: its high-water mark is this run's alone
                code = (
                    # one thread: on a shared CPU machine it times more steadily
                    "import json, torch; torch.set_num_threads(1); from benchmarks.gradients import one; "
                    f"print(json.dumps(one({name!r}, {n}, {size}, {batch}, {str(device)!r}, {repeats})))"
                )
                res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            else:
                rows.append(one(name, n, size, batch, str(device), repeats))
    for r in rows:
        first = next(q for q in rows if q["method"] == r["method"] and q["N"] == ns[0])
        r["peak / peak at first N"] = r["peak MB"] / first["peak MB"] if first["peak MB"] > 0 else float("nan")
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        a.plot([r["N"] for r in rs], [r["peak MB"] for r in rs], "o-", label=name)
        line = b.plot([r["N"] for r in rs], [r["(fwd+bwd) / forward pass"] for r in rs], "o-", label=name)[0]
        b.plot([r["N"] for r in rs], [r["method's bound"] for r in rs], ":", color=line.get_color(), lw=1)
    # quick mode measures in-process, where the peak above the baseline can be 0: no log axis then
    mem_scale = "log" if all(r["peak MB"] > 0 for r in rows) else "linear"
    a.set(xscale="log", yscale=mem_scale, xlabel="steps N", ylabel="peak memory above baseline [MB]")
    a.set_title("memory of a gradient through sampling")
    b.set(xscale="log", xlabel="steps N", ylabel="(forward + backward) / one sampling pass")
    b.axhline(3.0, color="grey", ls=":", lw=1)
    b.set_title("time (CPU time; CUDA: wall time), dotted: bounds")
    a.legend(fontsize=8)
    ns = sorted({r["N"] for r in rows})
    for ax in (a, b):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict[str, Any]:
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns = [2, 3] if quick else [10, 50, 200]
    size, batch, repeats = (4, 1, 1) if quick else (32, 2, 2)
    rows = measure(ns, size, batch, device, repeats, fresh=not quick)
    print_table(
        rows,
        f"Gradient of a loss on the sample w.r.t. noise and weights; ConvNet {batch}x4x{size}x{size}, {device}, "
        f"float32 (memory: {'CUDA allocator peak' if device.type == 'cuda' else 'RSS high-water mark'} above the "
        f"pre-run level{', one process per row' if not quick else ', one process: not for citing'})",
    )
    payload = {"device": str(device), "size": size, "batch": batch, "quick": quick, "rows": rows}
    save(results_dir, "gradients" + ("_quick" if quick else ""), payload)
    plot(rows, Path(img_dir) / ("gradients_memory" + ("_quick" if quick else "") + ".png"))
    return payload
