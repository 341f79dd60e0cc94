"""Speed and memory, all ratios measured side by side in one run.

1. Per-step solver overhead on 4x4x64x64 float32 latents, the model excluded: diffusers'
   ``DDIMScheduler.step``, a ``torch.add`` over the same tensors (the memory floor: one allocation and one
   pass), and our DDIM and BDIA-DDIM steps (a) given the prediction ``(x0, eps)``, (b) given an epsilon
   network's output, as the prediction that ``bdia.models.Model`` makes of it (diffusers' situation: its step
   gets the output and converts eps to x0 too), and (c) through ``Model`` around a network that returns that
   output (which adds the adapter: building the time tensor and checking the output); and the least an eager
   BDIA-DDIM step can do, two ``torch.add`` with precomputed coefficients. Each candidate runs ``inner``
   back-to-back calls per round, rounds interleaved, medians reported.
2. End to end with a small convolutional network: BDIA-DDIM / DDIM and EDICT / DDIM wall-time ratios.
3. Peak memory of sampling vs N: the bytes that the C allocator has handed out (glibc ``mallinfo2``: torch's
   CPU tensors live there), sampled inside every model call and after every step, minus those held before.

All in one intra-op thread (see ``benchmarks.threads``), so timings are comparable between runs on a shared
machine; the absolute numbers are this CPU's.
"""

from __future__ import annotations

import ctypes
import math
import operator
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import bdia
from bdia.models import PREDICTIONS, Model, Prediction, fold
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT
from bdia.state import State
from benchmarks import interleaved, outputs, print_table, pyplot, save, threads

__all__ = ["TinyConvNet", "run"]

SD = DiscreteVP.stable_diffusion()


class _Fixed:
    """A denoiser that returns a precomputed prediction: the solver's own cost, nothing else."""

    schedule = SD

    def __init__(self, pred: Prediction):
        self.pred = pred

    def __call__(self, x: torch.Tensor, t: float, **kw) -> Prediction:
        return self.pred


class _GivenEps:
    """A denoiser given an epsilon-network's output: the prediction that ``Model`` makes from ``(x, out)`` (x0 and
    eps as terms in x and out), without calling a network or building its time tensor. diffusers' step is given
    the same: the network's output and the latent."""

    schedule = SD

    def __init__(self, out: torch.Tensor):
        self.out = out

    def __call__(self, x: torch.Tensor, t: float, **kw) -> Prediction:
        a, b, c, d = PREDICTIONS["epsilon"](SD.at(t))
        return Prediction.affine(x, self.out, (a, b, c, d))


class TinyConvNet(nn.Module):
    """conv3x3(4 -> 64), SiLU, conv3x3(64 -> 4), plus a time bias: a stand-in for a (very) small U-Net."""

    def __init__(self, channels: int = 4, hidden: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.inp(x) + (t / 1000.0)[:, None, None, None])
        return 0.1 * self.out(h)


def _median_us(v: list[float]) -> float:
    return statistics.median(v) * 1e6


def _two_adds(x_prev: torch.Tensor, x: torch.Tensor, out: torch.Tensor, r: float, s: float) -> torch.Tensor:
    T = torch.add(out, x, alpha=r)
    return torch.add(x_prev, T, alpha=s, out=T)


def per_step(repeats: int, inner: int, shape: tuple[int, ...] = (4, 4, 64, 64)) -> dict:
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    x, x_prev, out, x0 = (torch.randn(shape, generator=g) for _ in range(4))
    fixed, given_eps = _Fixed(Prediction(x0, out)), _GivenEps(out)
    model = Model(lambda z, t: out, SD, "epsilon")
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sched.set_timesteps(50)
    t_d = sched.timesteps[10]
    ts = SD.timesteps(50, "leading", steps_offset=1).tolist()  # the same grid: 981, 961, ..., 1, 0
    state, t_next = State(x_prev, x, ts[9], ts[10]), ts[11]
    k, kn, kp = (
        SD.at(ts[10]),
        SD.at(t_next),
        SD.at(ts[9]),
    )  # gamma = 1: x_next = x_prev + Phi(x; ->next) - Phi(x; ->prev)
    c_x0, c_eps = kn.alpha - kp.alpha, kn.sigma - kp.sigma
    c_x, c_out = c_x0 / k.alpha, c_eps - c_x0 * k.sigma / k.alpha
    r = c_x / c_out  # |c_out| > |c_x| here: out leads, as the internal bdia._linalg.factored would choose
    ddim, bd, half = DDIM(), BDIA(DDIM(), 1.0), BDIA(DDIM(), 0.5)
    fns = {
        "torch.add (floor)": lambda: torch.add(x, out),
        "diffusers DDIMScheduler.step": lambda: sched.step(out, t_d, x, return_dict=False),
        "DDIM step, given (x0, eps)": lambda: ddim.step(fixed, state, t_next),
        "BDIA-DDIM step, given (x0, eps)": lambda: bd.step(fixed, state, t_next),
        "BDIA-DDIM gamma=0.5 step, given (x0, eps)": lambda: half.step(fixed, state, t_next),
        "DDIM step, given an eps net's output": lambda: ddim.step(given_eps, state, t_next),
        "BDIA-DDIM step, given an eps net's output": lambda: bd.step(given_eps, state, t_next),
        "DDIM step, eps net via Model": lambda: ddim.step(model, state, t_next),
        "BDIA-DDIM step, eps net via Model": lambda: bd.step(model, state, t_next),
        "bound: two torch.add, precomputed coefficients": lambda: _two_adds(x_prev, x, out, r, c_out),
    }
    # the same BDIA-DDIM update written directly on (x_prev, x, eps-net output) with precomputed coefficients,
    # x_prev + c_out (out + r x): the least an eager step can do (two passes over memory, one allocation)
    if not torch.allclose(_two_adds(x_prev, x, out, r, c_out), bd.step(model, state, t_next).x, rtol=1e-5, atol=1e-5):
        raise AssertionError("the bound does not compute the BDIA-DDIM update")
    # the same update (diffusers' DDIM and ours, at the same timestep, given the same eps)
    ours = ddim.step(model, state, t_next).x
    theirs = sched.step(out, t_d, x, return_dict=False)[0]
    agreement = float((ours - theirs).abs().max())
    for fn in fns.values():  # warm up allocator and caches
        fn()
    times = interleaved(fns, repeats, inner)
    med = {k: _median_us(v) for k, v in times.items()}
    floor, diff = med["torch.add (floor)"], med["diffusers DDIMScheduler.step"]
    rows = [
        {
            "operation": k,
            "median us": v,
            "x floor": v / floor,
            "x diffusers": v / diff,
            "min us": min(times[k]) * 1e6,
            # noise on a shared machine only ever adds time: the ratios of the minima are the steadier estimate
            "x floor (min)": min(times[k]) / min(times["torch.add (floor)"]),
            "x diffusers (min)": min(times[k]) / min(times["diffusers DDIMScheduler.step"]),
            "IQR us": (statistics.quantiles(times[k], n=4)[2] - statistics.quantiles(times[k], n=4)[0]) * 1e6,
        }
        for k, v in med.items()
    ]
    return {
        "shape": list(shape),
        "repeats": repeats,
        "inner": inner,
        "rows": rows,
        "ddim_vs_diffusers_maxabs": agreement,
    }


def _hand_loop(x: torch.Tensor, net, times: list[float], like: torch.Tensor, *, validated: bool = False):
    """The least a BDIA-DDIM walk can be in eager PyTorch: per step the network call with a time tensor built before
    the walk, then the two ``torch.add`` of ``x_prev + s (out + r x)`` with the coefficients computed before the walk
    (the first step, from a lone latent, a plain DDIM step: one add and one multiply). No validation, no state object,
    no checks. ``validated``: the network is called through ``Model.output``, which checks each output (a tensor of
    the latent's shape and dtype) and the time tensor (not edited in place): the per-step checks of a walk. Returns
    the walk as a function of nothing."""
    model = Model(net, SD, "epsilon")
    solver = BDIA(DDIM())
    ready = [model.prepare(t, like) for t in times]
    A, B, C = DDIM().coefficients(SD, times[0], times[1])
    (r0, s0), steps, prepared = _split(A, B, C, ready[0].m), [], []
    for j in range(2, len(times)):
        A, B, C = solver.coefficients(SD, times[j - 2], times[j - 1], times[j], 1.0)
        r, s = _split(A, B, C, ready[j - 1].m)
        steps.append((ready[j - 1].times, r, s))
        prepared.append((ready[j - 1], r, s))

    def walk() -> torch.Tensor:
        out = net(x, ready[0].times)
        x_prev, z = x, torch.add(out, x, alpha=r0).mul_(s0)
        for t, r, s in steps:
            out = net(z, t)
            T = torch.add(out, z, alpha=r)
            x_prev, z = z, torch.add(x_prev, T, alpha=s, out=T)
        return z

    # (a loop of its own rather than a branch in the one above, which stays the bare floor)
    output, kw = model.output, {}

    def validated_walk() -> torch.Tensor:
        out = output(x, ready[0], kw)
        x_prev, z = x, torch.add(out, x, alpha=r0).mul_(s0)
        for rd, r, s in prepared:
            out = output(z, rd, kw)
            T = torch.add(out, z, alpha=r)
            x_prev, z = z, torch.add(x_prev, T, alpha=s, out=T)
        return z

    return validated_walk if validated else walk


def _split(A: float, B: float, C: float, m: tuple) -> tuple[float, float]:
    """``A x + B x0 + C eps`` on (x, eps-network output) as ``s (out + r x)`` (the output's coefficient is the larger
    one on these grids, as for the library's own split)."""
    cu, cv = fold(B, C, m)
    return (A + cu) / cv, cv


CHECKED = "hand loop + the finite checks: a sum of the input before, of the result after"
VALIDATED = "checked hand loop + each network output checked (Model.output)"


def _finite_checked(x: torch.Tensor, walk: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """``walk`` from ``x`` with the checks a default walk promises: the input's sum before any network call, the
    result's after (the least a walk with ``check_finite`` can cost)."""

    def checked() -> None:
        if not math.isfinite(float(x.sum())):
            raise FloatingPointError("input")
        if not math.isfinite(float(walk().sum())):
            raise FloatingPointError("result")

    return checked


def default_path(repeats: int, shape: tuple[int, ...], steps: tuple[int, ...] = (20, 50), device: str = "cpu") -> dict:
    """``_default_path`` as users call it: outside inference mode (the rest of the benchmark runs inside it), with
    autograd's default mode (enabled; the walk turns the graph off itself), so the states it returns are tensors
    with version counters, as a user's are."""
    with torch.inference_mode(False), torch.enable_grad():
        return _default_path(repeats, shape, steps, device)


def _default_path(repeats: int, shape: tuple[int, ...], steps: tuple[int, ...], device: str) -> dict:
    """What users call, flags untouched: ``bdia.sample(model, x, ts, BDIA(DDIM()))`` and ``bdia.invert`` of its
    result, with a free model (a network that returns a stored tensor), per step, against the hand-written loop
    (``_hand_loop``: the network and two ``torch.add`` a step), diffusers' ``DDIMScheduler.step`` looped over the
    same grid, the hand loop with the two reductions of the default finite check (``CHECKED``: the least a checked
    walk can cost), that loop with each network output checked by ``Model.output`` as a walk checks it
    (``VALIDATED``: the least a walk with every check can cost) and ``torch.add`` (the floor: one pass over memory,
    one allocation), all interleaved in one run, at two step counts. The per-walk fixed cost of a call is what its
    walk time keeps at zero steps, fitted from the two step counts (``T(N) = fixed + N per_step``), in steps of the
    hand loop."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(0)
    x, stored = (torch.randn(shape, generator=g).to(device) for _ in range(2))

    def net(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return stored

    model, solver = Model(net, SD, "epsilon"), BDIA(DDIM())
    fns, grids = {}, {}
    for n in steps:
        grid = grids[n] = SD.timesteps(n, "leading", steps_offset=1)
        sched = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1,
        )  # fmt: skip
        sched.set_timesteps(n, device=device)

        def diffusers_loop(sched=sched) -> None:
            z = x
            for t in sched.timesteps:
                z = sched.step(stored, t, z, return_dict=False)[0]

        def adds(n=n) -> None:  # each result dropped at once, as a walk drops its old latents
            for _ in range(n):
                torch.add(x, stored)

        sampled = bdia.sample(model, x, grid, solver)
        by_hand = _hand_loop(x, net, grid.tolist(), x)
        if not torch.allclose(by_hand(), sampled.x, rtol=1e-5, atol=1e-5):
            raise AssertionError("the hand-written loop does not compute the BDIA-DDIM walk")
        fns[(n, "torch.add (floor)")] = adds
        fns[(n, "diffusers DDIMScheduler.step")] = diffusers_loop
        fns[(n, "hand-written loop: the network, two torch.add")] = by_hand

        fns[(n, CHECKED)] = _finite_checked(x, by_hand)
        validated = _hand_loop(x, net, grid.tolist(), x, validated=True)
        if not torch.equal(validated(), by_hand()):
            raise AssertionError("the validated hand loop does not compute the hand loop's walk")
        fns[(n, VALIDATED)] = _finite_checked(x, validated)
        fns[(n, "bdia.sample, BDIA(DDIM()), default flags")] = lambda grid=grid: bdia.sample(model, x, grid, solver)
        fns[(n, "bdia.invert of that sample, default flags")] = lambda grid=grid, s=sampled: bdia.invert(
            model, s, grid, solver
        )
    fns = _synced(fns, device)
    for fn in fns.values():
        fn()
    # a few back-to-back walks per round: each candidate is timed in the heap state it leaves itself (the CPU
    # allocator's state after diffusers' many small tensors slows the next candidate's large allocations)
    times = interleaved(fns, repeats, inner=3)
    per = {k: [v / k[0] for v in vs] for k, vs in times.items()}
    med = {k: _median_us(v) for k, v in per.items()}
    low = {k: min(v) * 1e6 for k, v in per.items()}
    hand, diff = "hand-written loop: the network, two torch.add", "diffusers DDIMScheduler.step"
    rows = []
    for (n, name), v in med.items():
        rows.append(
            {
                "steps": n,
                "per step": name,
                "median us": v,
                "x hand loop": v / med[(n, hand)],
                "x diffusers": v / med[(n, diff)],
                "x floor": v / med[(n, "torch.add (floor)")],
                "x hand loop (min)": low[(n, name)] / low[(n, hand)],
                "x diffusers (min)": low[(n, name)] / low[(n, diff)],
                # each round times every candidate back to back: the median of the rounds' own ratios cancels what
                # drifts between rounds (a shared machine's speed changes from second to second)
                "x hand loop (paired rounds)": statistics.median(map(operator.truediv, per[(n, name)], per[(n, hand)])),
            }
        )
    fixed = []
    lo, hi = min(steps), max(steps)

    def fit(d: dict, name: str) -> tuple[float, float]:
        """Walk times T(N) = N * per step, fitted as T = fixed + N slope through the two step counts."""
        t_lo, t_hi = d[(lo, name)] * lo, d[(hi, name)] * hi
        slope = (t_hi - t_lo) / (hi - lo)
        return t_lo - lo * slope, slope

    for name in (
        "bdia.sample, BDIA(DDIM()), default flags",
        "bdia.invert of that sample, default flags",
        CHECKED,
        VALIDATED,
        hand,
    ):
        paired = []  # each round's own fit, beyond the hand loop's in the same round
        for r in range(repeats):
            d = {k: v[r] for k, v in per.items()}
            (intercept, _), (hand_intercept, hand_step) = fit(d, name), fit(d, hand)
            paired.append((intercept - hand_intercept) / hand_step)
        for stat, d in (("median", med), ("min", low)):
            (intercept, slope), (hand_intercept, hand_step) = fit(d, name), fit(d, hand)
            fixed.append(
                {
                    "walk": name,
                    "statistic": stat,
                    "fixed us": intercept,
                    "fixed, in hand-loop steps": intercept / hand_step,
                    # the hand loop's own intercept is what any loop pays at a walk's start (its first steps run in
                    # caches the previous candidate left cold): what a call adds once per walk is the difference
                    "beyond the hand loop's, in its steps": (intercept - hand_intercept) / hand_step,
                    "beyond, median of the rounds' own fits": statistics.median(paired),
                    "per step, x the hand loop's": slope / hand_step,
                }
            )
    return {"shape": list(shape), "steps": list(steps), "repeats": repeats, "device": str(device), "rows": rows,
            "fixed": fixed}  # fmt: skip


def large_latents(repeats: int, shape: tuple[int, ...] = (1, 16, 1024, 1024), steps: int = 6) -> dict:
    """A latent far beyond the CPU allocator's cache (64 MiB): the default walk, which writes each step into the
    latent it drops, against the same walk allocating a fresh tensor every step."""
    from bdia import sampling

    g = torch.Generator().manual_seed(0)
    x, stored = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    model, solver = Model(lambda z, t: stored, SD, "epsilon"), BDIA(DDIM())
    grid = SD.timesteps(steps, "leading", steps_offset=1)
    limit = sampling._REUSE_BYTES

    def allocating() -> None:
        sampling._REUSE_BYTES = 1 << 62
        try:
            bdia.sample(model, x, grid, solver)
        finally:
            sampling._REUSE_BYTES = limit

    fns = {
        "default (writes into dropped latents)": lambda: bdia.sample(model, x, grid, solver),
        "allocating": allocating,
    }
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    med = {k: statistics.median(v) / steps * 1e3 for k, v in times.items()}
    rows = [{"walk": k, "ms per step": v, "x allocating": v / med["allocating"]} for k, v in med.items()]
    return {"shape": list(shape), "MiB": x.numel() * 4 / 2**20, "steps": steps, "rows": rows}


def _synced(fns: dict, device: str) -> dict:
    """On CUDA each timed call ends with a synchronisation, so that it is timed to its last kernel."""
    if torch.device(device).type != "cuda":
        return fns
    return {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in fns.items()}


def compiled(
    steps: int, repeats: int, backend: str, shape: tuple[int, ...] = (4, 4, 64, 64), device: str = "cpu"
) -> dict:
    """A BDIA walk with the network eager and ``torch.compile``d (compilation excluded: its first walk is timed apart);
    the walk itself is the same Python loop, and the compiled network is traced once for all steps."""
    net = TinyConvNet(shape[1]).to(device).eval().requires_grad_(False)
    fast = torch.compile(net, backend=backend)
    grid = SD.timesteps(steps, "leading", steps_offset=1)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    walks = {
        "eager network": lambda: bdia.sample(Model(net, SD, "epsilon"), z, grid, BDIA(DDIM())),
        f"torch.compile(network, backend={backend!r})": lambda: bdia.sample(
            Model(fast, SD, "epsilon"), z, grid, BDIA(DDIM())
        ),
    }
    fns = _synced(walks, device)
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    first = time.perf_counter() - t0
    times = interleaved(fns, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    eager = med["eager network"]
    rows = [{"walk": k, "steps": steps, "median s": v, "x eager": v / eager} for k, v in med.items()]
    return {"shape": list(shape), "backend": backend, "first_walks_s": first, "rows": rows}


def end_to_end(steps: int, repeats: int, shape: tuple[int, ...] = (4, 4, 64, 64), device: str = "cpu") -> dict:
    net = TinyConvNet(shape[1]).to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    model = Model(net, SD, "epsilon")
    grid = SD.timesteps(steps, "leading", steps_offset=1)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)
    solvers = {"DDIM": DDIM(), "BDIA-DDIM": BDIA(DDIM(), 1.0), "EDICT": EDICT()}
    fns = _synced({k: (lambda s=s: bdia.sample(model, z, grid, s)) for k, s in solvers.items()}, device)
    one = _synced({"net": lambda: net(z, torch.full((shape[0],), 500.0, device=device))}, device)
    t_net = interleaved(one, repeats, 3)["net"]
    for fn in fns.values():
        fn()
    times = interleaved(fns, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [
        {
            "solver": k,
            "steps": steps,
            "median s": v,
            "ratio to DDIM": v / med["DDIM"],
            "min ratio": min(times[k]) / min(times["DDIM"]),
        }
        for k, v in med.items()
    ]
    return {"shape": list(shape), "net_call_ms": statistics.median(t_net) * 1e3, "repeats": repeats, "rows": rows}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _heap_in_use():
    """Bytes handed out by glibc's malloc (heap and mmapped chunks), or None where mallinfo2 is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def in_use() -> int:
        m = fn()
        return m.uordblks + m.hblkhd

    return in_use


def peak_memory(ns: list[int], shape: tuple[int, ...] = (4, 4, 64, 64)) -> dict:
    in_use = _heap_in_use()
    if in_use is None:
        return {"skipped": "glibc mallinfo2 not available on this platform"}
    latent = torch.Size(shape).numel() * 4
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    rows = []
    for name, solver in {"DDIM": DDIM(), "BDIA-DDIM": BDIA(DDIM(), 1.0), "EDICT": EDICT()}.items():
        for n in ns:
            peak = [0]

            def probe(*_, peak=peak) -> None:
                peak[0] = max(peak[0], in_use())

            def net(x: torch.Tensor, t: torch.Tensor, probe=probe) -> torch.Tensor:
                y = torch.tanh(x)
                probe()
                return y

            model = Model(net, SD, "epsilon")
            grid = SD.timesteps(n, "leading", steps_offset=1)
            base = in_use()
            bdia.sample(model, z, grid, solver, callback=probe)
            rows.append(
                {
                    "solver": name,
                    "N": n,
                    "peak MB": (peak[0] - base) / 2**20,
                    "peak / latent": (peak[0] - base) / latent,
                }
            )
    return {"shape": list(shape), "latent_MB": latent / 2**20, "rows": rows}


def cuda_memory(ns: list[int], device: str, shape: tuple[int, ...] = (4, 4, 64, 64)) -> dict:
    """Peak device memory of sampling (``torch.cuda.max_memory_allocated``) beyond what the inputs hold, in latents."""
    latent = torch.Size(shape).numel() * 4
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device)
    model = Model(lambda x, t: torch.tanh(x), SD, "epsilon")
    rows = []
    for name, solver in {"DDIM": DDIM(), "BDIA-DDIM": BDIA(DDIM(), 1.0), "EDICT": EDICT()}.items():
        for n in ns:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            bdia.sample(model, z, SD.timesteps(n, "leading", steps_offset=1), solver)
            peak = torch.cuda.max_memory_allocated() - base
            rows.append({"solver": name, "N": n, "peak MB": peak / 2**20, "peak / latent": peak / latent})
    return {"latent_MB": latent / 2**20, "rows": rows}


def _plot(step: dict, e2e: dict, mem: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = step["rows"]
    axes[0].barh([r["operation"] for r in rows], [r["median us"] for r in rows], color="tab:blue")
    axes[0].invert_yaxis()
    axes[0].set_xlabel("median time per call [us]")
    axes[0].set_title(f"one step on {'x'.join(map(str, step['shape']))} float32 (model excluded)", fontsize=9)
    axes[0].tick_params(axis="y", labelsize=7)
    r2 = e2e["rows"]
    axes[1].bar([r["solver"] for r in r2], [r["ratio to DDIM"] for r in r2], color="tab:green")
    axes[1].axhline(1.0, color="k", lw=0.6)
    for i, r in enumerate(r2):
        axes[1].text(i, r["ratio to DDIM"], f"{r['ratio to DDIM']:.3f}", ha="center", va="bottom", fontsize=8)
    axes[1].set_title(f"end to end, tiny conv net, {r2[0]['steps']} steps: time / DDIM", fontsize=9)
    if "rows" in mem:
        for name in dict.fromkeys(r["solver"] for r in mem["rows"]):
            pts = [(r["N"], r["peak / latent"]) for r in mem["rows"] if r["solver"] == name]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        axes[2].set_xscale("log")
        axes[2].set_ylim(bottom=0)
        axes[2].set_xlabel("N (steps)")
        axes[2].set_ylabel("peak extra memory / one latent")
        axes[2].legend(fontsize=8)
        axes[2].set_title("peak memory of sampling vs N", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None, device: str = "cpu") -> dict:
    """The CPU benchmark (``device="cpu"``), or the GPU one (``"cuda"``: default path per step, compiled vs eager,
    end to end and peak device memory, saved as ``speed_cuda.json``)."""
    results_dir, img_dir = outputs(quick, results_dir, img_dir)
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device")
        with torch.inference_mode():
            return _run_cuda(quick, Path(results_dir), device)
    with threads(1), torch.inference_mode():
        return _run(quick, Path(results_dir), Path(img_dir))


def _run_cuda(quick: bool, results_dir: Path, device: str) -> dict:
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(torch.device(device))
    default = [
        default_path(repeats=3 if quick else 101, shape=shape, steps=(3, 5) if quick else (20, 50), device=device)
        for shape in ((4, 4, 64, 64), (1, 16, 128, 128), (16, 4, 128, 128))
    ]
    for d in default:
        print_table(d["rows"], f"Default path per step on {name}, {d['shape']} float32")
        print_table(d["fixed"], f"Per-walk fixed cost on {name}, {d['shape']}")
    comp = compiled(steps=3 if quick else 20, repeats=1 if quick else 15, backend="inductor", device=device)
    print_table(
        comp["rows"], f"Compiled vs eager network on {name} (first walks, compiling: {comp['first_walks_s']:.1f} s)"
    )
    e2e = end_to_end(steps=3 if quick else 20, repeats=1 if quick else 15, device=device)
    print_table(
        e2e["rows"], f"End to end on {name}, TinyConvNet {e2e['shape']} (one net call: {e2e['net_call_ms']:.3f} ms)"
    )
    mem = cuda_memory([2, 6] if quick else [5, 20, 100, 400], device)
    print_table(mem["rows"], f"Peak device memory of sampling (one latent = {mem['latent_MB']:.3f} MB)")
    payload = {"quick": quick, "device": name, "default_path": default, "compiled": comp, "end_to_end": e2e,
               "memory": mem, "seconds": time.perf_counter() - t0}  # fmt: skip
    save(results_dir, "speed_cuda", payload)
    return payload


def _run(quick: bool, results_dir: Path, img_dir: Path) -> dict:
    t0 = time.perf_counter()
    step = per_step(repeats=3 if quick else 41, inner=3 if quick else 20)
    print_table(step["rows"], f"Per step, {step['shape']} float32, model excluded (median of interleaved rounds)")
    print(
        f"our DDIM vs diffusers' DDIM, same eps and timestep: max |difference| = {step['ddim_vs_diffusers_maxabs']:.2e}"
    )
    big = None
    if not quick:  # a latent too big for the caches: the bandwidth-bound regime
        big = per_step(repeats=15, inner=5, shape=(16, 4, 128, 128))
        print_table(big["rows"], f"Per step, {big['shape']} float32, model excluded (median of interleaved rounds)")
    default = [
        default_path(repeats=3 if quick else 101, shape=shape, steps=(3, 5) if quick else (20, 50))
        for shape in ((4, 4, 64, 64), (1, 16, 128, 128))
    ]
    for d in default:
        print_table(d["rows"], f"Default path per step, {d['shape']} float32, free model (interleaved rounds)")
        print_table(d["fixed"], f"Per-walk fixed cost, {d['shape']}, fitted over {d['steps']} steps")
    large = None if quick else large_latents(repeats=7)
    if large is not None:
        print_table(large["rows"], f"A {large['MiB']:.0f} MiB latent, {large['steps']} steps")
    # quick mode checks the plumbing with dynamo's eager backend (no C++ compilation in the test suite)
    comp = compiled(steps=3 if quick else 20, repeats=1 if quick else 15, backend="eager" if quick else "inductor")
    print_table(comp["rows"], f"Compiled vs eager network (first walks, compiling: {comp['first_walks_s']:.1f} s)")
    e2e = end_to_end(steps=3 if quick else 20, repeats=1 if quick else 15)
    # what the per-step overheads predict for the end-to-end ratio (the measured one carries the machine's noise)
    us = {r["operation"]: r["median us"] for r in step["rows"]}
    net_us = e2e["net_call_ms"] * 1e3
    e2e["predicted_bdia_ratio"] = (net_us + us["BDIA-DDIM step, eps net via Model"]) / (
        net_us + us["DDIM step, eps net via Model"]
    )
    print_table(e2e["rows"], f"End to end, TinyConvNet on {e2e['shape']} (one net call: {e2e['net_call_ms']:.2f} ms)")
    print(f"BDIA-DDIM / DDIM predicted from the per-step overheads: {e2e['predicted_bdia_ratio']:.4f}")
    mem = peak_memory([2, 6] if quick else [5, 20, 100, 400])
    if "rows" in mem:
        print_table(mem["rows"], f"Peak memory of sampling (one latent = {mem['latent_MB']:.3f} MB)")
    else:
        print(mem["skipped"])
    img_dir.mkdir(parents=True, exist_ok=True)
    _plot(step, e2e, mem, img_dir / "speed_summary.png")
    payload = {
        "quick": quick,
        "per_step": step,
        "per_step_large": big,
        "default_path": default,
        "large_latents": large,
        "compiled": comp,
        "end_to_end": e2e,
        "memory": mem,
        "seconds": time.perf_counter() - t0,
    }
    save(results_dir, "speed", payload)
    return payload
