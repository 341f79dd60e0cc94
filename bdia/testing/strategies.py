"""Hypothesis strategies for the objects of diffusion sampling: schedules, grids, gammas, latents, integrators,
solvers, denoisers and whole walks. Needs hypothesis (``pip install "bdia[testing]"``).

Schedules are the kinds users run (Stable Diffusion's and other discrete VP tables, zero terminal SNR, continuous
VP, EDM, rectified flow), each built once so that solvers' per-schedule memos are exercised as in a real run;
grids are the spacings each schedule's users actually run (diffusers' leading/trailing/linspace with either end
point, Karras grids with and without the final 0, SD3's shift) and, now and then, an arbitrary decreasing grid.
``walks()`` draws a compatible whole: a denoiser of a parametrisation that is defined on the grid, a solver that
applies there, a dtype whose precision the walk's declared amplification leaves meaningful, and latents.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st

from bdia.gamma import BoundedOBELM, obelm_gamma
from bdia.integrators import Integrator
from bdia.models import Denoiser, GaussianMixture, Model
from bdia.schedules import EDM, VP, DiscreteVP, Flow, Schedule
from bdia.solvers import BDIA, DDIM
from bdia.testing.networks import MixtureNet, random_model
from bdia.testing.registry import FAMILIES, INTEGRATORS, Choice, Family, Interval

__all__ = [
    "SCHEDULES",
    "Walk",
    "denoisers",
    "gammas",
    "grids",
    "integrators",
    "latents",
    "schedules",
    "solvers",
    "walks",
]

SCHEDULES: dict[str, Any] = {
    "sd": DiscreteVP.stable_diffusion,
    "cosine": lambda: DiscreteVP.from_betas("squaredcos_cap_v2"),
    "linear": lambda: DiscreteVP.from_betas("linear", beta_start=1e-4, beta_end=0.02),
    "zsnr": lambda: DiscreteVP.from_betas("scaled_linear", rescale_zero_terminal_snr=True),
    "vp": VP,
    "edm": EDM,
    "flow": Flow,
}
"""The schedule kinds, by name: each a zero-argument factory."""

_BUILT: dict[str, Schedule] = {}


def schedule(kind: str) -> Schedule:
    """The schedule of a kind in ``SCHEDULES``, built once."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {sorted(SCHEDULES)}")
    if kind not in _BUILT:
        _BUILT[kind] = SCHEDULES[kind]()
    return _BUILT[kind]


def schedules(kinds: Sequence[str] | None = None) -> st.SearchStrategy[Schedule]:
    """Schedules of the given kinds (default: all of ``SCHEDULES``)."""
    names = sorted(SCHEDULES) if kinds is None else list(kinds)
    for k in names:
        schedule(k)  # (validates the names now, not at draw time)
    return st.sampled_from(names).map(schedule)


def grid(s: Schedule, n: int, variant: int = 0) -> torch.Tensor:
    """A grid of ``n`` steps of a kind ``s``'s users run (``variant`` picks among them, cyclically)."""
    if isinstance(s, DiscreteVP):
        options: list[dict[str, Any]] = [
            dict(spacing="leading", steps_offset=1),
            dict(spacing="trailing"),
            dict(spacing="linspace", set_alpha_to_one=True),
            dict(spacing="trailing", set_alpha_to_one=True),
            dict(spacing="leading", steps_offset=0),
        ]
        if float(s.alphas_cumprod[-1]) == 0.0:  # zero terminal SNR is run with trailing spacing (Lin et al.)
            options = [dict(spacing="trailing"), dict(spacing="trailing", set_alpha_to_one=True)]
        n = min(n, s.num_train_timesteps)
        return s.timesteps(n, **options[variant % len(options)])
    if isinstance(s, VP):
        return s.timesteps(n, eps=[1e-3, 1e-2][variant % 2])
    if isinstance(s, EDM):
        return s.timesteps(max(n, 2), rho=[7.0, 3.0][variant % 2], final_zero=variant % 3 != 2)
    if isinstance(s, Flow):
        return s.timesteps(n, shift=[1.0, 3.0][variant % 2])
    raise TypeError(f"no standard grids for {s!r}; draw custom ones with grids(s, custom=1.0)")


@st.composite
def _custom_grid(draw: st.DrawFn, s: Schedule, n: int) -> torch.Tensor:
    """An arbitrary strictly decreasing grid over the schedule's range, fractional discrete times included."""
    lo, hi = s.t_min, s.t_max
    if isinstance(s, VP):
        lo = 1e-3  # VP's sigma'(0) is infinite
    inner = draw(
        st.lists(st.floats(lo, hi, allow_nan=False, exclude_min=True, exclude_max=True), min_size=n - 1, max_size=n - 1)
    )
    times = sorted({hi, lo, *inner}, reverse=True)
    return torch.tensor(times, dtype=torch.float64)


def grids(
    schedule: Schedule | None = None, *, min_steps: int = 2, max_steps: int = 50, custom: float = 0.2
) -> st.SearchStrategy[Any]:
    """Grids of ``schedule`` (float64 tensors, noisiest first), or ``(schedule, grid)`` pairs over ``schedules()``
    when none is given. ``custom``: the share of arbitrary decreasing grids among the standard ones."""
    if not (1 <= min_steps <= max_steps):
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps} and {max_steps}")
    if not (0.0 <= custom <= 1.0):
        raise ValueError(f"custom must lie in [0, 1] (a share of the draws), got {custom}")

    @st.composite
    def of(draw: st.DrawFn, s: Schedule) -> torch.Tensor:
        n = draw(st.integers(min_steps, max_steps))
        if custom > 0 and draw(st.floats(0, 1)) < custom:
            return draw(_custom_grid(s, n))
        return grid(s, n, draw(st.integers(0, 5)))

    if schedule is not None:
        return of(schedule)
    return schedules().flatmap(lambda s: of(s).map(lambda g: (s, g)))


def gammas(min_value: float = 0.05, max_value: float = 1.0, *, per_step: bool = False) -> st.SearchStrategy[Any]:
    """BDIA's gamma: floats in ``[min_value, max_value]`` with 1 (the symmetric scheme) drawn often, and with
    ``per_step`` O-BELM's per-step functions too."""
    if not (0.0 <= min_value <= max_value <= 1.0):
        raise ValueError(f"need 0 <= min_value <= max_value <= 1, got {min_value} and {max_value}")
    floats = st.floats(min_value, max_value, allow_nan=False)
    out = st.one_of(st.just(max_value), floats)
    if per_step:
        out = st.one_of(out, st.sampled_from([obelm_gamma, BoundedOBELM(1.0)]))
    return out


def latents(
    shape: Sequence[int] | st.SearchStrategy[Sequence[int]],
    dtype: torch.dtype | st.SearchStrategy[torch.dtype] = torch.float32,
    *,
    scale: float = 1.0,
    elements: st.SearchStrategy[float] | None = None,
) -> st.SearchStrategy[torch.Tensor]:
    """Tensors of ``shape`` and ``dtype`` (each may be a strategy): standard normal times ``scale`` from a drawn
    seed (fast, any size), or drawn element by element from ``elements`` (shrinks, for small shapes)."""
    shapes = shape if isinstance(shape, st.SearchStrategy) else st.just(tuple(shape))
    dtypes = dtype if isinstance(dtype, st.SearchStrategy) else st.just(dtype)

    @st.composite
    def draw_one(draw: st.DrawFn) -> torch.Tensor:
        sh, dt = tuple(draw(shapes)), draw(dtypes)
        if elements is not None:
            n = math.prod(sh)
            values = draw(st.lists(elements, min_size=n, max_size=n))
            return torch.tensor(values, dtype=torch.float64).reshape(sh).to(dt)
        seed = draw(st.integers(0, 2**31 - 1))
        z = torch.randn(sh, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (z * scale).to(dt)

    return draw_one()


def integrators(affine: bool | None = None) -> st.SearchStrategy[Integrator]:
    """Fresh instances of bdia's integrators (``affine``: only the single-evaluation ones, or only the others)."""
    kinds = [k for k in INTEGRATORS if affine is None or k().affine == affine]
    return st.sampled_from(kinds).map(lambda k: k())


def _param(p: Choice | Interval) -> st.SearchStrategy[Any]:
    if isinstance(p, Interval):
        floats = st.floats(p.lo, p.hi, allow_nan=False)
        return floats if p.favourite is None else st.one_of(st.just(p.favourite), floats)
    return st.sampled_from(p.options).map(lambda o: o() if isinstance(o, type) else o)


def family_solvers(family: Family) -> st.SearchStrategy[Any]:
    """Solvers of one ``bdia.testing.registry.Family``, its parameters drawn."""
    return st.fixed_dictionaries({k: _param(p) for k, p in family.params.items()}).map(lambda kw: family.make(**kw))


def solvers(
    *, exact: bool | None = True, bitwise: bool | None = False, families: Sequence[Family] | None = None
) -> st.SearchStrategy[Any]:
    """Solvers from ``bdia.testing.registry.FAMILIES``: by default those that invert exactly in exact arithmetic
    and round in floating point (``exact=None``: the one-step integrators' approximate inversion too;
    ``bitwise=None`` or ``True``: the fixed-point ``Exact`` too, or only it)."""
    chosen = [
        f
        for f in (FAMILIES if families is None else families)
        if (exact is None or f.exact == exact) and (bitwise is None or f.bitwise == bitwise)
    ]
    if not chosen:
        raise ValueError(f"no solver family has exact={exact} and bitwise={bitwise}")
    return st.one_of(*[family_solvers(f) for f in chosen])


# ---------------------------------------------------------------------------------------------------------------
# denoisers and whole walks

PREDICTIONS = ("epsilon", "sample", "v", "velocity")


def defined(prediction: str | None, s: Schedule, times: list[float], from_data: bool) -> bool:
    """Whether a parametrisation gives ``(x0, eps)`` along the walk: an epsilon model cannot give x0 where alpha = 0
    (the grid's noisy end at zero terminal SNR, rectified flow's t = 1), an x0 model cannot give eps where
    sigma = 0 (the clean end, from which inverting data starts). ``None``: the analytic mixture, defined everywhere."""
    if prediction == "epsilon" and s.at(times[0]).alpha == 0:
        return False
    return not (prediction == "sample" and from_data and s.at(times[-1]).sigma == 0)


@st.composite
def denoisers(
    draw: st.DrawFn,
    schedule: Schedule,
    *,
    networks: bool = True,
    predictions: Sequence[str] = PREDICTIONS,
    dtype: torch.dtype = torch.float32,
) -> tuple[Denoiser, tuple[int, ...]]:
    """``(denoiser, latent shape per sample)``: the analytic Gaussian mixture itself, the mixture seen through a
    network of a drawn parametrisation (``Model``), or with ``networks`` a seeded random conv net (``RandomNet``)
    in ``dtype``."""
    kind = draw(st.sampled_from(["mixture", "mixture-net", "conv"] if networks else ["mixture", "mixture-net"]))
    seed = draw(st.integers(0, 2**16))
    if kind == "conv":
        pred = draw(st.sampled_from(list(predictions)))
        hw = draw(st.sampled_from([(4, 4), (4, 8), (8, 8)]))
        return random_model(schedule, pred, seed=seed, dtype=dtype), (2, *hw)
    gmm = GaussianMixture.random(schedule, dim=8, components=3, std=0.5, seed=seed % 64)
    if kind == "mixture":
        return gmm, (8,)
    pred = draw(st.sampled_from(list(predictions)))
    return Model(MixtureNet(gmm, pred), schedule, pred, time_dtype=torch.float64), (8,)


@dataclasses.dataclass(frozen=True)
class Walk:
    """A drawn round trip: ``noise`` at ``grid[0]`` to sample and invert, ``data`` at ``grid[-1]`` to invert and
    sample back (``None`` where the solver is not for inverting data on this walk), with ``model`` and ``solver``
    (``bitwise``: the solver inverts to the bit). ``check(**kw)`` runs ``bdia.testing.round_trip`` for each."""

    model: Denoiser
    grid: torch.Tensor
    solver: Any
    noise: torch.Tensor
    data: torch.Tensor | None
    bitwise: bool

    def round_trips(self, **kw: Any) -> list[Any]:
        """The ``RoundTrip`` reports of both round trips (``bdia.testing.round_trip``; ``kw`` are its keywords)."""
        from bdia.testing.roundtrip import round_trip

        starts = [(self.noise, False)] + ([(self.data, True)] if self.data is not None else [])
        return [
            round_trip(self.model, x, self.grid, self.solver, from_data=d, bitwise=self.bitwise, **kw)
            for x, d in starts
        ]

    def __repr__(self) -> str:
        return (
            f"Walk({self.model!r}, {self.solver!r}, {len(self.grid) - 1} steps of "
            f"{self.grid[0].item():g}..{self.grid[-1].item():g}, {tuple(self.noise.shape)} {self.noise.dtype}"
            f"{'' if self.data is not None else ', noise only'})"
        )


# the rounding growth a walk may declare, per dtype, and its steps: past them the bound is too wide to mean anything
_BUDGET = {torch.float64: 1e8, torch.float32: 1e2, torch.float16: 2.0, torch.bfloat16: 1.0}
_MAX_STEPS = {torch.float64: 50, torch.float32: 50, torch.float16: 8, torch.bfloat16: 3}


def _amplification(solver: Any, s: Schedule, times: list[float]) -> float:
    """The larger of what the solver declares for sampling and for inverting over ``times`` (inf: it refuses)."""
    try:
        return max(solver.amplification(s, times, True), solver.amplification(s, times, False))
    except ValueError:  # a gamma of 0 somewhere on the walk: it cannot be inverted
        return math.inf


def _fits(family: Family, solver: Any, s: Schedule, times: list[float], dtype: torch.dtype) -> bool:
    return bool(family.round_trips(solver, s, times)) and _amplification(solver, s, times) <= _BUDGET[dtype]


@st.composite
def walks(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[torch.dtype] = (torch.float64, torch.float32),
    networks: bool = True,
    families: Sequence[Family] | None = None,
    batch: Sequence[int] = (1, 3),
    max_steps: int = 50,
) -> Walk:
    """A compatible round trip: schedule, grid, denoiser (of a parametrisation defined on the grid), an exact solver
    that is for this walk (``Family.round_trips``), a dtype whose precision leaves the check meaningful (at most
    ``_BUDGET[dtype]`` of declared amplification, a few steps in half precision, the analytic mixture only there),
    noise and data. ``families`` defaults to the registry's exact ones, the bitwise ``Exact`` included; a draw the
    family is not for, or too fragile for the dtype, falls back to the family's gamma = 1, then to float64, then to
    BDIA-DDIM at gamma = 1."""
    chosen = [f for f in (FAMILIES if families is None else families) if f.exact]
    if not chosen:
        raise ValueError("walks() needs at least one family with exact=True")
    dtype = draw(st.sampled_from(list(dtypes)))
    s = draw(schedules())
    ts = grid(s, draw(st.integers(2, min(max_steps, _MAX_STEPS[dtype]))), draw(st.integers(0, 5)))
    times = ts.tolist()
    family = draw(st.sampled_from(chosen))
    solver = draw(family_solvers(family))
    if not _fits(family, solver, s, times, dtype):
        solver = family.make(**{k: (1.0 if k == "gamma" else p.values()[0]) for k, p in family.params.items()})
        if family.round_trips(solver, s, times) and not _fits(family, solver, s, times, dtype):
            dtype = torch.float64
        if not _fits(family, solver, s, times, dtype):
            family = next(f for f in FAMILIES if f.name == "bdia")
            solver = BDIA(DDIM(), 1.0)
    directions = family.round_trips(solver, s, times)
    model, shape = draw(denoisers(s, networks=networks and dtype.itemsize >= 4, dtype=dtype))
    pred = getattr(model, "prediction", None)
    if not defined(pred, s, times, from_data=True):
        model, shape = GaussianMixture.random(s, dim=8, components=3, std=0.5, seed=draw(st.integers(0, 63))), (8,)
    b = draw(st.sampled_from(list(batch)))
    k = s.at(times[0])
    noise = draw(latents((b, *shape), torch.float64, scale=math.hypot(k.alpha, k.sigma)))
    if isinstance(model, GaussianMixture):
        data = model.sample(b, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
        data = data.reshape(b, *shape)
    else:
        data = draw(latents((b, *shape), torch.float64))
    return Walk(model, ts, solver, noise.to(dtype), data.to(dtype) if True in directions else None, family.bitwise)
