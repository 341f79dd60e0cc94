"""Round trips with a tolerance that measures the walk: ``round_trip`` and ``assert_round_trip``.

A round trip runs a walk ``W1`` (``bdia.sample``, or ``bdia.invert`` of data) and then its inverse ``W2`` from the
state ``W1`` returned. An exact solver's ``W2`` recomputes every evaluation of ``W1``: while its inputs have the
same bits, so do the evaluations, and all that separates the trajectories is the rounding of the combinations each
step writes, carried by the rest of ``W2``. The rounding model, per sample, at every point ``m`` of ``W2``::

    |W2_m - W1_m| <= sum_{1 <= k <= m} (c u |state_k| + n_k) max(1, G_{k -> m})

- ``u``: the unit roundoff of the latents' dtype (``torch.finfo(dtype).eps / 2``); ``|state_k|``: the norm of the
  state (both latents) at point ``k``;
- ``c`` (``roundings``): how often a step and its inverse round each latent they write, counted from the solver's
  arithmetic: 4 for one scaled add each way (a product and a sum: BDIA at gamma = 1), 6 for BDIA's
  ``g (x_prev + (s/g) T)`` at other gammas, 12 for EDICT's two scaled adds with a scale per latent. A constant of the
  solver, not of any machine: a solver declares its own as ``roundings`` (else 4, one scaled add each way);
- ``n_k``: the evaluation's own rounding, which stops cancelling once the inputs of ``W2`` differ from those of
  ``W1`` (from its second step on): measured as what the step makes of the first walk's state moved by about a
  unit in the last place (a network rounds at the scale of its largest intermediate values, and a parametrisation
  that scales its output up, x0 prediction next to clean data, passes that on);
- ``G_{k -> m}``: how much ``W2`` itself grows a perturbation of the state at ``k`` by ``m``, measured on this walk:
  a small random perturbation (relative size ``sqrt(u)`` of the probe's dtype, less if the walk grows it past
  linearity) is carried by the solver's own ``step``/``unstep`` from the first point of ``W2`` and from its middle,
  by finite differences in float64 where the denoiser runs in float64 (or a ``shadow`` denoiser does), else in
  the walk's dtype. It holds the solver's parasitic root (``1/gamma`` per inverse BDIA step), the flow's own growth
  and whatever the network adds (a random conv net grows a perturbation 10-20x over 50 SD steps at gamma = 1, an x0
  network on an EDM grid 5e3x), none of which a constant tolerance can know.

Nothing in the bound is measured from the step being checked against its own inverse, so an inexact inverse cannot
hide in it. The growth and the evaluation noise are only measured when the error exceeds the bound without them
(``G = 1``, ``n = 0``), unless ``growth=True``. A bound beyond ``max_relative_bound`` of the start's norm means the
check could not fail: ``assert_round_trip`` then refuses it (``ValueError``) instead of passing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

import bdia
from bdia.models import Denoiser
from bdia.state import State

__all__ = ["ROUNDINGS", "RoundTrip", "assert_round_trip", "round_trip"]

ROUNDINGS = 4  # c: roundings of relative size u of each latent, by the step that writes it and its inverse (two each)
_NUDGES = 2  # draws of the evaluation's response to inputs a few ulps away; the larger is kept
_LINEAR = 3e-3  # a probe's perturbation must stay below this share of the state to measure a linear growth


@dataclasses.dataclass(frozen=True, eq=False)
class RoundTrip:
    """One round trip measured against the rounding model (per sample; tensors are float64 on the CPU).

    ``errors[m]`` / ``bounds[m]``: ``|W2_m - W1_m|`` and its bound at each point ``m`` of the second walk (both
    latents of the state); ``growths[m]``: the measured growth from point ``m`` to the end and ``noise[m]`` the
    evaluation noise of the step that made point ``m`` (``None`` when they were not needed); ``error``:
    ``|output - start|``, the round trip itself; ``parted``: the first point where the trajectories parted (an
    error past its bound), or ``None``.
    """

    direction: str
    solver: str
    dtype: torch.dtype
    times: list[tuple[float, float]]  # (t_prev, t) of each point of W2, in walk order
    start: torch.Tensor  # (B,) |start|
    scales: torch.Tensor  # (P, B) |state_k|, the first walk's state at each point of W2
    error: torch.Tensor  # (B,) |output - start|
    errors: torch.Tensor  # (P, B)
    bounds: torch.Tensor  # (P, B)
    growths: torch.Tensor | None  # (P, B): measured growth from point m to the end of W2
    noise: torch.Tensor | None  # (P, B): the evaluation noise n_k
    amplification: float  # what the solver declares for W2 (an estimate of its parasitic root's growth)
    unit_roundoff: float
    roundings: int
    probe: str  # how the growth was measured
    max_relative_bound: float
    bitwise: bool = False

    @property
    def bound(self) -> torch.Tensor:
        """The bound on the round trip's error (the last point's), per sample."""
        return torch.zeros_like(self.error) if self.bitwise else self.bounds[-1]

    @property
    def growth(self) -> torch.Tensor | None:
        """The growth of a perturbation over the whole second walk, per sample (``None``: not measured)."""
        return None if self.growths is None else self.growths[0]

    @property
    def parted(self) -> int | None:
        bad = (self.errors > self.bounds).any(dim=1)
        return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None

    @property
    def ok(self) -> bool:
        if self.bitwise:
            return bool((self.errors == 0).all())
        return self.parted is None and bool((self.error <= self.bound).all())

    @property
    def checkable(self) -> bool:
        """Whether the bound is small enough for the check to mean something (``max_relative_bound`` of |start|)."""
        return self.bitwise or bool((self.bound <= self.max_relative_bound * self.start).all())

    @property
    def ratio(self) -> float:
        """The largest ``error / bound`` over the points and samples (below 1: within the model; bitwise: 0 or inf)."""
        if self.bitwise:
            return 0.0 if self.ok else math.inf
        e = torch.cat([self.errors, self.error[None]])
        b = torch.cat([self.bounds, self.bound[None]])
        r = torch.where(e == 0, 0.0, e / b)
        return float(r.max())

    def worst(self) -> int:
        """The sample with the largest error relative to its bound."""
        e, b = self.error, self.bound
        return int(torch.where(e == 0, 0.0, e / torch.where(b == 0, math.inf, b)).argmax()) if e.numel() else 0

    def __str__(self) -> str:
        i = self.worst()
        n = len(self.times) - 1
        rel = float(self.error[i] / self.start[i]) if float(self.start[i]) > 0 else math.inf
        lines = [
            f"round trip ({self.direction}) of {self.solver} over {n} steps in {self.dtype}: "
            + (
                "exact to the bit" if self.ok and self.bitwise else "within the rounding model" if self.ok else "FAILED"
            ),
        ]
        if self.bitwise:
            lines.append(
                f"  bitwise: the second walk must return the first walk's states to the bit; largest difference "
                f"{float(self.errors.max()):.3e}, output {float(self.error.max()):.3e}"
            )
        else:
            lines.append(
                f"  error {float(self.error[i]):.3e} (relative {rel:.3e}) against the bound {float(self.bound[i]):.3e} "
                f"(relative {float(self.bound[i] / self.start[i]):.3e}) in sample {i} of {self.error.numel()}"
            )
            lines.append(
                f"  bound = sum_k ({self.roundings} u |state_k| + n_k) max(1, G_k), u = {self.unit_roundoff:.3g}, n_k "
                "the evaluation's rounding once the inputs differ, G_k the growth of a perturbation of point k"
            )
            if self.growths is None:
                lines.append("  growth and evaluation noise: not measured (the error is within the bound without them)")
            else:
                lines.append(
                    f"  growth over the second walk: {float(self.growths[0, i]):.3g} (largest over the batch "
                    f"{float(self.growths[0].max()):.3g}), measured by {self.probe}; the solver declares an "
                    f"amplification of {self.amplification:.3g} (its parasitic root alone); evaluation noise "
                    f"{float(self.noise[:, i].sum()):.3e} summed over the steps"
                )

        m = self.parted
        if m is not None:
            j = int(((self.errors[m] > self.bounds[m]) * (self.errors[m] + 1)).argmax())
            a, b = self.times[m]
            lines.append(
                f"  the trajectories parted at point {m} of the second walk (state at t = ({a}, {b})): error "
                f"{float(self.errors[m, j]):.3e} against the bound {float(self.bounds[m, j]):.3e} (sample {j})"
            )
        if not self.checkable:
            lines.append(
                f"  the bound exceeds {self.max_relative_bound:g} of the start's norm: this round trip cannot show an "
                "inexact inverse (use float64, fewer steps or gamma closer to 1)"
            )
        return "\n".join(lines)


def round_trip(
    model: Denoiser,
    x: torch.Tensor,
    ts: torch.Tensor,
    solver: Any,
    *,
    from_data: bool = False,
    bitwise: bool = False,
    growth: bool | None = None,
    shadow: Denoiser | None = None,
    max_amplification: float | None = None,
    max_relative_bound: float = 0.1,
    roundings: int | None = None,
    seed: int = 0,
    **conditioning: Any,
) -> RoundTrip:
    """Sample ``x`` (noise at ``ts[0]``) over ``ts`` and invert the result, or with ``from_data=True`` invert ``x``
    (data at ``ts[-1]``) and sample the inverted state back; measure both trajectories against the rounding model
    (module docstring). Returns the ``RoundTrip``; raises nothing for an inexact round trip.

    ``bitwise``: the solver claims bit-exact inversion (``bdia.exact.Exact``): the second walk must return the first
    walk's states to the bit. ``growth``: ``None`` measures the walk's growth only when the error needs it, ``True``
    always, ``False`` never (the bound then takes ``G = 1``). ``shadow``: a denoiser computing the same function in
    float64, for a network that only runs in its own dtype. ``roundings``: the model's ``c`` (default
    ``bdia.testing.registry.roundings(solver)``: a ``roundings`` attribute of the solver, the count of bdia's own
    solvers, else 4). ``seed``: of the probes' random directions and nudges. ``conditioning`` goes to every model
    call of both walks.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {type(x).__name__}")
    if growth is not None and not isinstance(growth, bool):
        raise TypeError(f"growth must be None, True or False, got {growth!r}")
    if (
        isinstance(max_relative_bound, bool)
        or not isinstance(max_relative_bound, int | float)
        or not max_relative_bound > 0
    ):
        raise ValueError(f"max_relative_bound must be a number > 0, got {max_relative_bound!r}")
    if roundings is None:
        from bdia.testing.registry import roundings as count

        roundings = count(solver)
    if isinstance(roundings, bool) or not isinstance(roundings, int) or roundings < 1:
        raise ValueError(
            f"roundings must be an int >= 1 (roundings of each latent per step and inverse), got {roundings!r}"
        )
    first, second = (bdia.invert, bdia.sample) if from_data else (bdia.sample, bdia.invert)
    kw = dict(max_amplification=max_amplification, **conditioning)
    with torch.no_grad():
        w1: list[State] = []
        out = first(model, x, ts, solver, callback=lambda s: w1.append(_oriented(s.state)), **kw)
        walk = ts.tolist() if not from_data else ts.flip(0).tolist()
        if not w1 or walk[0] not in (w1[0].t_prev, w1[0].t):
            # the solver's init took no step (EDICT's coupled copies): its state is the walk's first point
            w1.insert(0, _oriented(solver.init(model, x, walk[0], walk[1], **conditioning)))
        w2: list[State] = [_oriented(out)]
        back = second(model, out, ts, solver, callback=lambda s: w2.append(_oriented(s.state)), **kw)

        by_time = {(s.t_prev, s.t): s for s in w1}
        missing = [(s.t_prev, s.t) for s in w2 if (s.t_prev, s.t) not in by_time]
        if missing:
            raise AssertionError(
                f"the second walk of {solver!r} visited states at times {missing[:3]} that the first walk did not: "
                "a solver's inverse must retrace its walk"
            )
        ref = [by_time[(s.t_prev, s.t)] for s in w2]
        errors = torch.stack([_norms(_diff(a, b)) for a, b in zip(w2, ref, strict=True)])
        error = _rows(back.x.double() - x.double())
        start = _rows(x.double())
        sizes = torch.stack([_norms(s) for s in ref])
        dtype = x.dtype
        u = torch.finfo(dtype).eps / 2
        times = [(s.t_prev, s.t) for s in w2]
        amp = float(solver.amplification(model.schedule, ts.tolist(), from_data))
        report = dict(
            direction="invert, then sample" if from_data else "sample, then invert",
            solver=repr(solver),
            dtype=dtype,
            times=times,
            start=start,
            scales=sizes,
            error=error,
            errors=errors,
            amplification=amp,
            unit_roundoff=u,
            roundings=roundings,
            max_relative_bound=float(max_relative_bound),
            bitwise=bitwise,
        )
        flat = roundings * u * sizes.cumsum(0)  # the bound with G = 1 and no evaluation noise
        within = bool((errors <= flat).all()) and bool((error <= flat[-1]).all())
        if bitwise or growth is False or (within and growth is None):
            return RoundTrip(bounds=flat, growths=None, noise=None, probe="not measured", **report)
        noise = _noise(model, solver, ref, from_data, u, seed, conditioning)
        local = roundings * u * sizes + noise
        table, probe = _growth_table(model, shadow, solver, w2, from_data, seed, conditioning)
        reach = torch.ones(len(w2), len(w2), dtype=torch.bool).triu()[:, :, None]  # k <= m
        bounds = (local[:, None, :] * torch.where(reach, table.clamp(min=1.0), 0.0)).sum(0)
        growths = table[:, -1, :]
        return RoundTrip(bounds=bounds, growths=growths, noise=noise, probe=probe, **report)


def assert_round_trip(
    model: Denoiser,
    x: torch.Tensor | None,
    ts: torch.Tensor,
    solver: Any,
    *,
    data: torch.Tensor | None = None,
    bitwise: bool = False,
    growth: bool | None = None,
    shadow: Denoiser | None = None,
    max_amplification: float | None = None,
    max_relative_bound: float = 0.1,
    roundings: int | None = None,
    **conditioning: Any,
) -> list[RoundTrip]:
    """Assert that ``solver`` inverts its own walks to within the rounding model (module docstring).

    ``x``: noise at ``ts[0]``, sampled then inverted (``None`` to skip); ``data``: latents at ``ts[-1]``, inverted
    then sampled back (where asked). Raises ``AssertionError`` naming the error, the bound, the measured growth and
    the point where the trajectories parted; ``ValueError`` if the bound is so large (growth, dtype, steps) that the
    check could not fail. Returns the ``RoundTrip`` reports. The other keywords are ``round_trip``'s.
    """
    if x is None and data is None:
        raise ValueError("pass x (noise to sample and invert), data (latents to invert and sample back), or both")
    reports = []
    for start, from_data in ((x, False), (data, True)):
        if start is None:
            continue
        r = round_trip(
            model,
            start,
            ts,
            solver,
            from_data=from_data,
            bitwise=bitwise,
            growth=growth,
            shadow=shadow,
            max_amplification=max_amplification,
            max_relative_bound=max_relative_bound,
            roundings=roundings,
            **conditioning,
        )
        if not r.ok:
            raise AssertionError(str(r))
        if not r.checkable:
            raise ValueError(str(r))
        reports.append(r)
    return reports


# ---------------------------------------------------------------------------------------------------------------
# the growth of the second walk, measured by finite differences


def _noise(model, solver, ref: list[State], forward: bool, u: float, seed: int, kw: dict) -> torch.Tensor:
    """What each step makes of inputs a few units in the last place away from the first walk's: the evaluation's own
    rounding, which cancels between the two walks only while their inputs have the same bits (so not at the first
    step, whose input is shared). A network rounds at the scale of its largest intermediate values, and a
    parametrisation that scales its output up (x0 prediction near clean data, 1/sigma) passes that on; the response
    also holds the step's linear growth of the nudge (about ``2 u |state|``), a small overcount. The larger of
    ``_NUDGES`` draws, per step and sample, measured with the solver's own step at the first walk's states."""
    move = solver.step if forward else solver.unstep
    gen = torch.Generator().manual_seed(seed + 1)
    zero = torch.zeros(ref[0].x.shape[0], dtype=torch.float64)
    noise = [zero, zero]
    for k in range(2, len(ref)):
        target, before = _target(ref[k], forward), ref[k - 1]
        made = move(model, before, target, **kw)
        worst = zero
        for _ in range(_NUDGES):
            nudged = before.replace(x=_ulps(before.x, u, gen), x_prev=_ulps(before.x_prev, u, gen))
            worst = torch.maximum(worst, _norms(_diff(move(model, nudged, target, **kw), made)))
        noise.append(worst)
    return torch.stack(noise[: len(ref)])


def _ulps(v: torch.Tensor, u: float, gen: torch.Generator) -> torch.Tensor:
    """``v`` with its elements moved by about a unit in their last place (relative ``2 u z``, z standard normal)."""
    z = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
    return (v.double() * (1.0 + 2.0 * u * z)).to(v.dtype)


def _growth_table(
    model: Denoiser, shadow: Denoiser | None, solver: Any, w2: list[State], forward: bool, seed: int, kw: dict
) -> tuple[torch.Tensor, str]:
    """``G[k, m]``: the growth of a perturbation of point ``k`` of ``w2`` by point ``m`` (``m >= k``; 0 below), per
    sample, from probes started at the walk's first point and at its middle (each probe's growth from ``k`` to
    ``m`` is the ratio of its perturbation's sizes there; the larger of the probes is kept)."""
    P, B = len(w2), w2[0].x.shape[0]
    probe_model, dtype, how = _probe_precision(model, shadow, w2, kw)
    u = torch.finfo(dtype).eps / 2
    table = torch.zeros(P, P, B, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    starts = [0] if P < 6 else [0, P // 2]
    d_used = []
    for p in starts:
        d = math.sqrt(u)
        for _ in range(4):
            sizes = _probe(probe_model, solver, w2, p, forward, d, dtype, gen, kw)
            scale = torch.stack([_norms(s) for s in w2[p:]])
            rel = float((sizes / scale.clamp(min=1e-300)).max())
            if rel <= _LINEAR or d <= 64 * u:
                break
            d = max(64 * u, d * _LINEAR / (3 * rel))  # shrink until the perturbation stays linear
        d_used.append(d)
        ratio = sizes[None, :, :] / sizes[:, None, :].clamp(min=1e-300)  # (k, m, B) for k, m >= p
        upper = torch.ones(P - p, P - p, dtype=torch.bool).triu()[:, :, None]
        table[p:, p:] = torch.maximum(table[p:, p:], torch.where(upper, ratio, 0.0))
    return table, f"{how} (relative perturbation {min(d_used):.1e}, probes from points {starts})"


def _probe_precision(model, shadow, w2: list[State], kw: dict) -> tuple[Denoiser, torch.dtype, str]:
    """The denoiser and dtype the probes run in: float64 if ``shadow`` or ``model`` runs there (float32 for half
    precision as a second choice), else the walk's own dtype."""
    walk = w2[0].x.dtype
    candidates = [torch.float64] if walk == torch.float64 else [torch.float64, torch.float32]
    candidates = [c for c in candidates if c.itemsize > walk.itemsize or c == walk]
    mid = w2[len(w2) // 2]
    for dt in candidates:
        for m in (shadow, model) if shadow is not None else (model,):
            if dt == walk and m is model:
                return model, walk, f"finite differences in {walk}"
            try:
                p = m(mid.x.to(dt), mid.t, **kw)
                works = p.x0.dtype == dt and p.eps.dtype == dt
            except (RuntimeError, TypeError, ValueError):
                works = False
            if works:
                return m, dt, f"finite differences in {dt}" + (" (shadow denoiser)" if m is shadow else "")
    return model, walk, f"finite differences in {walk}"


def _probe(model, solver, w2: list[State], p: int, forward: bool, d: float, dtype, gen, kw) -> torch.Tensor:
    """Carry a perturbation of relative size ``d`` of point ``p`` to the end of ``w2``: its size at each point."""
    move = solver.step if forward else solver.unstep
    own = dtype == w2[0].x.dtype
    nominal = w2[p].to(dtype)
    perturbed = nominal.replace(x=nominal.x + _direction(nominal.x, d, gen), x_prev=_kick(nominal, d, gen))
    sizes = [_norms(_diff(perturbed, nominal))]
    for m in range(p + 1, len(w2)):
        target = _target(w2[m], forward)
        perturbed = move(model, perturbed, target, **kw)
        nominal = w2[m] if own else move(model, nominal, target, **kw)
        sizes.append(_norms(_diff(perturbed, nominal)))
    return torch.stack(sizes)


def _kick(state: State, d: float, gen: torch.Generator) -> torch.Tensor:
    return state.x_prev + _direction(state.x_prev, d, gen, like=state.x)


def _direction(v: torch.Tensor, d: float, gen: torch.Generator, like: torch.Tensor | None = None) -> torch.Tensor:
    """A random perturbation of ``v`` whose norm is ``d`` times ``v``'s, per sample (``like``'s where ``v`` is 0)."""
    z = torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device)
    size = _rows(v.double())
    if like is not None:
        size = torch.where(size > 0, size, _rows(like.double()))
    scale = d * size / _rows(z).clamp(min=1e-300)
    return (z * scale.to(v.device).reshape(-1, *[1] * (v.dim() - 1))).to(v.dtype)


def _target(state: State, forward: bool) -> float:
    """The time the step that made ``state`` moved to (states in sampling orientation)."""
    return state.t if forward or state.coupled else state.t_prev


def _oriented(s: State) -> State:
    """A state in sampling orientation (``x_prev`` the noisier point), as ``step`` and ``unstep`` take it."""
    return s.flipped() if not s.coupled and s.t_prev < s.t else s


def _diff(a: State, b: State) -> tuple[torch.Tensor, torch.Tensor]:
    return a.x.double() - b.x.double().to(a.x.device), a.x_prev.double() - b.x_prev.double().to(a.x.device)


def _norms(s: State | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sample norm of both latents of a state (float64, CPU)."""
    x, x_prev = (s.x, s.x_prev) if isinstance(s, State) else s
    return torch.hypot(_rows(x.double()), _rows(x_prev.double()))


def _rows(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).cpu()
