"""BDIA's gamma, resolved once at construction: a constant, one per sample, or one per step (O-BELM's).

``x_next = gamma x_prev + F(x)`` (Zhang, Lewis & Kleijn, ECCV 2024, eq. 14). Whatever form the user gives, ``BDIA``
holds one ``Gamma`` that answers ``at(schedule, t_prev, t, t_next, x)`` (a python float, or a float64 tensor shaped
to broadcast over the batch) and ``bounds(...)`` (its smallest and largest value at a step, python floats, known
without looking at any tensor: the walk checks a grid's amplification with them before any network call).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from bdia.schedules import Schedule

__all__ = ["BoundedOBELM", "Constant", "Gamma", "PerSample", "PerStep", "as_gamma", "obelm_gamma"]

GammaFn = Callable[[Schedule, float, float, float], float]


class Gamma(ABC):
    """A gamma for every step of a walk."""

    constant: float | None = None  # the value, when it is one python float at every step

    @property
    def identity(self) -> str:
        """How a state's identity names this gamma (``bdia.solvers.identity``)."""
        return repr(self)

    pure: bool = True  # a function of the schedule and times alone (a walk's plan may be kept for the next walk)
    batch: int | None = None  # the batch size it needs (one per sample), or None for any

    @abstractmethod
    def at(self, schedule: Schedule, t_prev: float, t: float, t_next: float, x: torch.Tensor) -> float | torch.Tensor:
        """gamma for the step ``t -> t_next`` whose previous point is at ``t_prev``, for the batch ``x``."""

    @abstractmethod
    def bounds(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> tuple[float, float]:
        """The smallest and largest gamma over the batch at this step (python floats; no tensor is read)."""


def _check_unit(g: float, what: str = "gamma") -> float:
    if not (0.0 <= g <= 1.0):
        raise ValueError(f"{what} must lie in [0, 1], got {g} (gamma > 1 makes sampling unstable)")
    return g


class Constant(Gamma):
    """One gamma in [0, 1] for every step and sample (0: the plain integrator; 1: the symmetric scheme)."""

    def __init__(self, value: float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"gamma must be a float, a (batch,) tensor or a function, got {type(value).__name__}")
        self.constant = _check_unit(float(value))

    def at(self, schedule: Schedule, t_prev: float, t: float, t_next: float, x: torch.Tensor) -> float:
        return self.constant

    def bounds(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> tuple[float, float]:
        return self.constant, self.constant

    def __repr__(self) -> str:
        return repr(self.constant)


class PerSample(Gamma):
    """One gamma in [0, 1] per sample: a 1-D floating tensor of the batch's size.

    The tensor is copied (detached, float64) and checked once, here: editing the caller's tensor later changes
    nothing, and gamma never carries a gradient (it is a constant of the scheme, not a parameter).
    """

    def __init__(self, values: torch.Tensor):
        if values.dim() != 1 or not values.is_floating_point() or values.numel() == 0:
            raise ValueError(
                f"a gamma tensor must be 1-D floating point with one entry per sample, got {values.dtype} "
                f"of shape {tuple(values.shape)}"
            )
        self.values = values.detach().to(torch.float64, copy=True)
        self.lo, self.hi = float(self.values.min()), float(self.values.max())  # one sync, at construction
        if math.isnan(self.lo) or math.isnan(self.hi):
            raise ValueError("gamma must lie in [0, 1], got NaN in the gamma tensor")
        _check_unit(self.lo), _check_unit(self.hi)
        self.batch = self.values.numel()
        self._on: dict[torch.device, torch.Tensor] = {}  # a copy per device: no host-to-device copy in the step loop

    def at(self, schedule: Schedule, t_prev: float, t: float, t_next: float, x: torch.Tensor) -> torch.Tensor:
        if self.values.shape[0] != x.shape[0]:
            raise ValueError(f"gamma has {self.values.shape[0]} entries but the batch has {x.shape[0]} samples")
        on = self._on.get(x.device)
        if on is None:
            on = self._on[x.device] = self.values.to(x.device)
        return on.reshape(-1, *([1] * (x.dim() - 1)))

    def bounds(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> tuple[float, float]:
        return self.lo, self.hi

    @property
    def identity(self) -> str:
        """Per-sample values are not part of a state's identity: a state's rows can be selected (``state[rows]``) and
        continued with the matching rows of gamma."""
        return "per-sample"

    def __repr__(self) -> str:
        return f"tensor({self.values.tolist()})"


class PerStep(Gamma):
    """``fn(schedule, t_prev, t, t_next) -> float >= 0``: one gamma per step, the same for every sample.

    A per-step gamma may exceed 1 (O-BELM's does on some grids): stability is set by the amplification
    ``gamma alpha(t_prev) / alpha(t_next)``, which the walk bounds before it starts (docs/theory.md).
    """

    def __init__(self, fn: GammaFn):
        self.fn = fn

    @property
    def pure(self) -> bool:  # type: ignore[override]
        """O-BELM's published and bounded gammas are functions of the times alone; a user's function may read
        anything, so a walk asks it again every time."""
        return self.fn is obelm_gamma or isinstance(self.fn, BoundedOBELM)

    def at(self, schedule: Schedule, t_prev: float, t: float, t_next: float, x: torch.Tensor | None = None) -> float:
        value = self.fn(schedule, t_prev, t, t_next)
        if isinstance(value, torch.Tensor):
            raise TypeError(
                f"gamma({t_prev}, {t}, {t_next}) returned a tensor; a per-step gamma function returns a python float "
                "(for one gamma per sample pass a (batch,) tensor as gamma)"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"gamma({t_prev}, {t}, {t_next}) returned {type(value).__name__}; expected a float")
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"gamma({t_prev}, {t}, {t_next}) returned {value}; expected a finite number >= 0")
        return value

    def bounds(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> tuple[float, float]:
        g = self.at(schedule, t_prev, t, t_next)
        return g, g

    def __repr__(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def as_gamma(gamma: float | torch.Tensor | GammaFn | Gamma) -> Gamma:
    """The ``Gamma`` for a float, a ``(batch,)`` tensor, a per-step function or a ``Gamma``."""
    if isinstance(gamma, Gamma):
        return gamma
    if isinstance(gamma, torch.Tensor):
        return PerSample(gamma)
    if callable(gamma) and not isinstance(gamma, type):
        return PerStep(gamma)
    return Constant(gamma)


def obelm_gamma(schedule: Schedule, t_prev: float, t: float, t_next: float) -> float:
    """O-BELM (Wang et al., NeurIPS 2024) as a per-step BDIA gamma (docs/theory.md, "The family").

    In scaled time ``sbar = sigma/alpha`` with ``h_i = sbar(t) - sbar(t_next)`` and
    ``h_{i+1} = sbar(t_prev) - sbar(t)``: ``gamma_i = (h_i / h_{i+1})^2 alpha(t_next) / alpha(t_prev)``.
    """
    sb = schedule.snr_sbar
    h_i, h_ip1 = sb(t) - sb(t_next), sb(t_prev) - sb(t)
    if math.isinf(h_ip1):  # the previous point is pure noise (alpha = 0): no usable history
        return 0.0
    return (h_i / h_ip1) ** 2 * schedule.at(t_next).alpha / schedule.at(t_prev).alpha


class BoundedOBELM:
    """O-BELM's per-step gamma with its parasitic root bounded: ``gamma_i = min(obelm_gamma, max_root alpha(t_next) /
    alpha(t_prev))``, i.e. ``a_i = (h_i / h_{i+1})^2`` capped at ``max_root`` (docs/theory.md, "O-BELM near t = 0").

    Why: where the steps in ``sbar`` grow from one step to the next (``h_i > h_{i+1}``: the last steps of a grid
    uniform in a discrete VP schedule's index, where ``sbar ~ sqrt(t)``), O-BELM's minimum-local-error coefficients
    extrapolate: ``gamma_i`` reaches 5 on a 100-step trailing grid, and the noise prediction enters with weight
    ``h_i (h_i + h_{i+1}) / h_{i+1}``, three times DDIM's. On exact predictions that is harmless (the analytic
    mixtures); on a trained network it amplifies the network's error where it is largest, next to clean data.
    Capping ``a_i`` at 1 leaves every step with ``h_i <= h_{i+1}`` as published (second order where the grid is smooth
    in ``sbar``, since there ``a_i = 1 + O(h)``), never amplifies the parasitic mode, and keeps ``gamma_i > 0``, so the
    walk stays exactly invertible. A function of the times alone, like ``obelm_gamma``.
    """

    def __init__(self, max_root: float = 1.0):
        if isinstance(max_root, bool) or not isinstance(max_root, int | float):
            raise TypeError(f"max_root must be a float > 0, got {type(max_root).__name__}")
        if not (math.isfinite(max_root) and max_root > 0):
            raise ValueError(f"max_root must be finite and > 0 (1: no amplified parasitic root), got {max_root}")
        self.max_root = float(max_root)

    def __call__(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> float:
        g = obelm_gamma(schedule, t_prev, t, t_next)
        a_prev = schedule.at(t_prev).alpha
        if a_prev == 0:  # obelm_gamma is 0 there already
            return g
        return min(g, self.max_root * schedule.at(t_next).alpha / a_prev)

    def __repr__(self) -> str:
        return f"BoundedOBELM(max_root={self.max_root})"
