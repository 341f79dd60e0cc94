"""Every integrator and solver bdia ships, as families of parameters: the one list the property tests draw from.

A ``Family`` says how to build a solver from its parameters, which values each parameter takes (``Choice``: a
few, ``Interval``: a range of floats), whether its ``unstep`` is the exact inverse of its ``step`` (the one-step
integrators' inversion is approximate), whether it inverts to the bit (fixed point), and on which walks it applies.
``bdia.testing.strategies.solvers()`` draws from ``FAMILIES``; ``examples()`` gives a deterministic handful per
family for parametrised tests; the project's tests fail for a public solver class that no family builds, so a new
solver is covered by adding it here.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from bdia.exact import Exact, fraction
from bdia.gamma import BoundedOBELM, obelm_gamma
from bdia.integrators import DDIM, DDIMInverse, DPMSolver2, Euler, Heun, Integrator, ScaledHeun
from bdia.schedules import Schedule
from bdia.solvers import BDIA, EDICT, OBELM

__all__ = [
    "BOTH",
    "FAMILIES",
    "INTEGRATORS",
    "Choice",
    "Family",
    "Interval",
    "covered_types",
    "examples",
    "roundings",
]

INTEGRATORS: tuple[type[Integrator], ...] = (Euler, DDIM, DDIMInverse, Heun, ScaledHeun, DPMSolver2)
"""The one-step integrators, each built with no arguments."""


@dataclasses.dataclass(frozen=True)
class Choice:
    """A parameter taking one of a few values; a zero-argument class among them is called for a fresh instance."""

    options: tuple[Any, ...]

    def values(self) -> list[Any]:
        return [o() if isinstance(o, type) else o for o in self.options]


@dataclasses.dataclass(frozen=True)
class Interval:
    """A float parameter in ``[lo, hi]``; ``favourite`` is drawn often (gamma = 1, EDICT's p = 0.93)."""

    lo: float
    hi: float
    favourite: float | None = None

    def values(self) -> list[float]:
        """Examples: the favourite, the upper end and the middle (the lower end is an extreme, for draws)."""
        picks = [self.favourite, self.hi, round((self.lo + self.hi) / 2, 6)]
        return list(dict.fromkeys(v for v in picks if v is not None))


Param = Choice | Interval


BOTH = (False, True)  # round trips: sample then invert (False), invert data then sample (True)


def _both(solver: Any, schedule: Schedule, times: list[float]) -> tuple[bool, ...]:
    return BOTH


def _history(solver: Any, schedule: Schedule, times: list[float]) -> tuple[bool, ...]:
    """Not on a walk that starts where alpha = 0 (pure noise): EDICT's update and O-BELM's gamma divide by it."""
    return BOTH if schedule.at(times[0]).alpha > 0 else ()


def _fixed_point_range(solver: Exact, schedule: Schedule, times: list[float]) -> tuple[bool, ...]:
    """The exact mode's integers hold ``|x| < 2^(61 - frac_bits)`` (2048 for float64's default 50 bits): not on a walk
    that starts next to alpha = 0 (an epsilon model's ``x0 = (x - sigma eps) / alpha`` reaches ``1/alpha`` times the
    data), and not inverting data over a walk whose wrapped BDIA grows rounding past 100: data's pair is not one that
    sampling made, and its inverse grows it like ``1/gamma`` per step (the integers are exact: the states really are
    that large); and not where a step's gamma is too small for a fraction ``p/q`` with ``q <= 2^30``."""
    if schedule.at(times[0]).alpha < 0.01:
        return ()
    try:  # each step's gamma as the fraction p/q the mode multiplies by (O-BELM's can be too small for one)
        for t_prev, t, t_next in zip(times, times[1:], times[2:], strict=False):
            fraction(solver.solver.gamma.bounds(schedule, t_prev, t, t_next)[0], solver.max_numerator)
    except ValueError:
        return ()
    return BOTH if solver.solver.amplification(schedule, times, False) <= 1e2 else (False,)


@dataclasses.dataclass(frozen=True)
class Family:
    """Solvers built by ``make(**params)``.

    ``exact``: ``unstep`` inverts ``step`` exactly in exact arithmetic (a round trip then differs by rounding only);
    ``bitwise``: also in floating point, to the bit; ``round_trips(solver, schedule, times)``: the round trips the
    family's ``solver`` is defined for over ``times`` (grid in sampling order): ``False`` sample then invert,
    ``True`` invert data then sample, none if the walk is not for it.
    """

    name: str
    make: Callable[..., Any]
    params: Mapping[str, Param]
    exact: bool
    bitwise: bool = False
    round_trips: Callable[[Any, Schedule, list[float]], tuple[bool, ...]] = _both

    def examples(self) -> Iterator[Any]:
        """One solver per value of each parameter, the others at their first value (a handful, not the product)."""
        firsts = {k: p.values()[0] for k, p in self.params.items()}
        seen: set[str] = set()
        for name, param in self.params.items():
            for value in param.values():
                solver = self.make(**{**firsts, name: value})
                if repr(solver) not in seen:
                    seen.add(repr(solver))
                    yield solver

    def cases(self, solver: Any) -> list[Any]:
        """``bdia.testing.checks.standard_round_trips()`` cut to the round trips this family's ``solver`` is for."""
        from bdia.testing.checks import standard_round_trips

        out = []
        for case in standard_round_trips():
            allowed = self.round_trips(solver, case.schedule, case.grid.tolist())
            directions = tuple(d for d in case.directions if d in allowed)
            if directions:
                out.append(dataclasses.replace(case, directions=directions))
        return out


def _bdia(integrator: Integrator, gamma: Any, same_backward: bool) -> BDIA:
    return BDIA(integrator, gamma, backward=type(integrator)() if same_backward else None)


def _exact(integrator: Integrator, gamma: Any) -> Exact:
    return Exact(BDIA(integrator, gamma))


FAMILIES: tuple[Family, ...] = (
    Family("integrator", lambda integrator: integrator, {"integrator": Choice(INTEGRATORS)}, exact=False),
    Family(
        "bdia",
        _bdia,
        {
            "integrator": Choice(INTEGRATORS),
            "gamma": Interval(0.05, 1.0, favourite=1.0),
            "same_backward": Choice((False, True)),
        },
        exact=True,
    ),
    Family(
        "bdia-per-step",
        _bdia,
        {
            "integrator": Choice((DDIM, Euler, ScaledHeun)),
            "gamma": Choice((obelm_gamma, BoundedOBELM(1.0))),
            "same_backward": Choice((False,)),
        },
        exact=True,
        round_trips=_history,
    ),
    Family("obelm", OBELM, {"max_root": Choice((None, 1.0, 2.0))}, exact=True, round_trips=_history),
    Family(
        "edict",
        EDICT,
        {
            "integrator": Choice((DDIM, Euler)),
            "p": Interval(0.5, 1.0, favourite=0.93),
            "alternate": Choice((False, True)),
        },
        exact=True,
        round_trips=_history,
    ),
    Family(
        "exact",
        _exact,
        {"integrator": Choice((DDIM, Euler, Heun)), "gamma": Choice((1.0, 0.5, 0.94, obelm_gamma))},
        exact=True,
        bitwise=True,
        round_trips=_fixed_point_range,
    ),
)


def examples(families: tuple[Family, ...] = FAMILIES) -> list[tuple[Family, Any]]:
    """``(family, solver)`` for every family's ``examples()``: each parameter value appears once."""
    return [(f, s) for f in families for s in f.examples()]


def covered_types(families: tuple[Family, ...] = FAMILIES) -> set[type]:
    """The classes the families build, the integrators inside them included."""
    out: set[type] = set()
    for _, solver in examples(families):
        for part in itertools.chain([solver], vars(solver).values()):
            out.add(type(part))
            if isinstance(part, BDIA):
                out |= {type(part.integrator), type(part.backward)}
    return out


# how often a step and its inverse round each latent they write, counted from each solver's arithmetic
_COUNTS: tuple[tuple[type, Callable[[Any], int]], ...] = (
    # two scaled adds per latent each way (the integrator's update with the other copy's noise, then the mixing),
    # each a product, a sum and the scale: 6 + 6
    (EDICT, lambda s: 12),
    # gamma = 1: x_prev + s T, one scaled add each way (2 + 2); else g (x_prev + (s/g) T) and its inverse (3 + 3)
    (BDIA, lambda s: 4 if s.gamma.constant == 1.0 else 6),
)


def roundings(solver: Any) -> int:
    """The rounding model's ``c`` for ``solver`` (``bdia.testing.round_trip``): its own ``roundings`` attribute if it
    declares one, else the count for bdia's solvers (BDIA: 4 at gamma = 1, 6 otherwise; EDICT: 12), else
    ``ROUNDINGS`` (one scaled add each way)."""
    from bdia.testing.roundtrip import ROUNDINGS

    declared = getattr(solver, "roundings", None)
    if isinstance(declared, int) and not isinstance(declared, bool):
        return declared
    for kind, count in _COUNTS:
        if isinstance(solver, kind):
            return count(solver)
    return ROUNDINGS
