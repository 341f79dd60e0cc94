"""Noise schedules: how data and noise mix, ``x_t = alpha(t) x0 + sigma(t) eps``.

Every schedule answers one question, ``schedule.at(t)``, with the four float64 numbers
``(alpha, sigma, dalpha/dt, dsigma/dt)`` in its own native time ``t``; larger ``t`` is always
noisier. A time grid is a plain 1-D float64 tensor, noisiest first, and each schedule has a
``timesteps`` method that builds the grids its models were trained for (diffusers' semantics for
the discrete one). Times are python floats (IEEE float64) in the step loop: no tensors, no device.
"""

from __future__ import annotations

import itertools
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["EDM", "VP", "Coefficients", "DiscreteVP", "Flow", "Schedule", "check_grid"]


class Coefficients(NamedTuple):
    """alpha(t), sigma(t) and their derivatives with respect to the schedule's native time."""

    alpha: float
    sigma: float
    dalpha: float
    dsigma: float


class Schedule(ABC):
    """A diffusion schedule in its native time ``t`` (``t_min <= t <= t_max``, larger is noisier)."""

    t_min: float
    t_max: float

    @abstractmethod
    def _at(self, t: float) -> Coefficients: ...

    def at(self, t: float) -> Coefficients:
        """alpha, sigma and their time derivatives at native time ``t`` (a python float)."""
        if not (self.t_min <= t <= self.t_max):
            raise ValueError(f"time t={t!r} is outside {type(self).__name__}'s range [{self.t_min}, {self.t_max}]")
        return self._at(t)

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        c = self.at(t)
        return c.alpha, c.sigma

    def snr_sbar(self, t: float) -> float:
        """sigma/alpha: the time of the scaled probability-flow ODE ``d(x/alpha)/d(sigma/alpha) = eps``."""
        c = self.at(t)
        return c.sigma / c.alpha if c.alpha > 0 else math.inf


def check_grid(ts: torch.Tensor, schedule: Schedule | None = None, name: str = "ts") -> list[float]:
    """Validate a time grid and return its times as python floats.

    A grid is a 1-D float64 tensor with at least two strictly decreasing times (noisiest first),
    inside the schedule's range when one is given.
    """
    if not isinstance(ts, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D float64 torch.Tensor of times, got {type(ts).__name__}")
    if ts.dtype != torch.float64:
        raise TypeError(f"{name} must have dtype torch.float64 (time arithmetic is float64), got {ts.dtype}")
    if ts.dim() != 1 or ts.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 times, got shape {tuple(ts.shape)}")
    times = ts.tolist()
    # (NaN fails every comparison, so a strictly decreasing grid can hold an infinity only at an end)
    if not all(map(operator.gt, times, itertools.islice(times, 1, None))):
        if not all(map(math.isfinite, times)):
            raise ValueError(f"{name} contains non-finite times: {times}")
        raise ValueError(f"{name} must be strictly decreasing (noisiest first), got {times}")
    if not (math.isfinite(times[0]) and math.isfinite(times[-1])):
        raise ValueError(f"{name} contains non-finite times: {times}")
    if schedule is not None and not (schedule.t_min <= times[-1] and times[0] <= schedule.t_max):
        raise ValueError(
            f"{name} spans [{times[-1]}, {times[0]}], outside {type(schedule).__name__}'s range "
            f"[{schedule.t_min}, {schedule.t_max}]"
        )
    return times


def _pchip_slopes(y: list[float]) -> list[float]:
    """Knot slopes of a monotone cubic Hermite interpolant (Fritsch-Butland harmonic mean) on unit spacing."""
    d = [b - a for a, b in itertools.pairwise(y)]
    m = [d[0]] + [(2.0 * a * b / (a + b)) if a * b > 0 else 0.0 for a, b in itertools.pairwise(d)] + [d[-1]]
    return m


class DiscreteVP(Schedule):
    """Discrete variance-preserving schedule (DDPM, Stable Diffusion): ``alpha = sqrt(abar[t])``.

    Native time is the training index ``t`` in ``0..T-1``; ``t = -1`` is the clean end point
    ``alpha = 1, sigma = 0`` (diffusers' ``final_alpha_cumprod = 1``). Fractional times interpolate
    the angle ``phi = atan2(sigma, alpha)`` with a monotone C1 cubic (PCHIP knots on the integer
    grid), so ``alpha = cos(phi)``, ``sigma = sin(phi)`` stay exactly variance preserving, are the
    table's ``sqrt(abar)``, ``sqrt(1 - abar)`` at integers, and have continuous derivatives everywhere
    (Euler in native time and Heun's corrector need them). The angle stays bounded even at zero terminal SNR
    (alpha = 0).
    """

    def __init__(self, alphas_cumprod: torch.Tensor | Sequence[float]):
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2:
            raise ValueError("alphas_cumprod must hold at least 2 values")
        if not bool(((abar >= 0) & (abar <= 1)).all()):
            raise ValueError("alphas_cumprod must lie in [0, 1]")
        if not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing in t")
        self.alphas_cumprod = abar
        self.num_train_timesteps = abar.numel()
        self.t_min, self.t_max = -1.0, float(self.num_train_timesteps - 1)
        # atan2(sqrt(1-abar), sqrt(abar)) is well conditioned at both ends, unlike acos(sqrt(abar)).
        phi = torch.atan2(torch.sqrt(1.0 - abar), torch.sqrt(abar))
        self._phi = [0.0, *phi.tolist()]  # knot j holds time j - 1
        # on the integer times the table itself is used: exact zeros at the ends (alpha = 0 at zero terminal SNR)
        self._alpha = [1.0, *abar.sqrt().tolist()]
        self._sigma = [0.0, *(1.0 - abar).sqrt().tolist()]
        self._slope = _pchip_slopes(self._phi)

    @classmethod
    def from_betas(
        cls,
        kind: str = "scaled_linear",
        *,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        rescale_zero_terminal_snr: bool = False,
    ) -> DiscreteVP:
        """Betas as diffusers defines them (computed here in float64).

        ``kind``: ``linear``, ``scaled_linear`` (linear in sqrt(beta), Stable Diffusion) or
        ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine, beta capped at 0.999).
        ``rescale_zero_terminal_snr``: Lin et al. (2023), Algorithm 1: shift and scale sqrt(abar) so
        that the last step is pure noise (then only x0-, v- or velocity-predicting models make sense there).
        """
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
            raise TypeError(f"num_train_timesteps must be an int, got {num_train_timesteps!r}")
        T = num_train_timesteps
        if T < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        makers = {
            "linear": lambda: torch.linspace(beta_start, beta_end, T, dtype=torch.float64),
            "scaled_linear": lambda: torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2,
            "squaredcos_cap_v2": lambda: _cosine_betas(T),
        }
        if kind not in makers:
            raise ValueError(f"unknown beta schedule kind={kind!r}; expected one of {sorted(makers)}")
        betas = makers[kind]()
        abar = torch.cumprod(1.0 - betas, dim=0)
        if rescale_zero_terminal_snr:
            s = abar.sqrt()
            s0, sT = s[0].clone(), s[-1].clone()
            abar = ((s - sT) * (s0 / (s0 - sT))) ** 2
        return cls(abar)

    @classmethod
    def stable_diffusion(cls, num_train_timesteps: int = 1000) -> DiscreteVP:
        """Stable Diffusion's schedule (1.x, 2.x, XL): ``scaled_linear`` betas from 0.00085 to 0.012."""
        return cls.from_betas(
            "scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=num_train_timesteps
        )

    def _at(self, t: float) -> Coefficients:
        # knots at j = 0..T hold times j - 1; locate the cubic piece containing t
        u = t + 1.0
        j = min(math.floor(u), len(self._phi) - 2)
        s = u - j
        p0, p1, m0, m1 = self._phi[j], self._phi[j + 1], self._slope[j], self._slope[j + 1]
        s2, s3 = s * s, s * s * s
        phi = (2 * s3 - 3 * s2 + 1) * p0 + (s3 - 2 * s2 + s) * m0 + (-2 * s3 + 3 * s2) * p1 + (s3 - s2) * m1
        dphi = (6 * s2 - 6 * s) * p0 + (3 * s2 - 4 * s + 1) * m0 + (-6 * s2 + 6 * s) * p1 + (3 * s2 - 2 * s) * m1
        if s in (0.0, 1.0):
            alpha, sigma = self._alpha[j + int(s)], self._sigma[j + int(s)]
        else:
            alpha, sigma = math.cos(phi), math.sin(phi)
        return Coefficients(alpha, sigma, -sigma * dphi, alpha * dphi)

    def timesteps(
        self,
        n: int,
        spacing: str = "leading",
        *,
        steps_offset: int = 0,
        set_alpha_to_one: bool = False,
    ) -> torch.Tensor:
        """diffusers' inference timesteps for ``n`` steps, plus the end point: ``n + 1`` float64 times.

        ``leading``: ``arange(n) * (T // n) + steps_offset``; ``trailing``: ``round(arange(T, 0, -T/n)) - 1``;
        ``linspace``: ``round(linspace(0, T - 1, n))``; each reversed (noisiest first).
        The end point is ``t = 0`` (``abar[0]``, Stable Diffusion's ``set_alpha_to_one=False``, our default)
        or ``t = -1`` (alpha = 1). Where the last timestep already is the end point (``leading`` with
        offset 0, ``linspace``, ending at ``abar[0]``), diffusers' final step is the identity and is
        dropped: the grid then has ``n`` points.
        """
        T = self.num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, int) or not (1 <= n <= T):
            raise ValueError(f"n must be an int in [1, {T}], got {n!r}")
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int):
            raise TypeError(f"steps_offset must be an int, got {steps_offset!r}")
        if spacing == "leading":
            steps = [k * (T // n) + steps_offset for k in range(n)]
        elif spacing == "trailing":
            delta = (T - T / n) - T  # as numpy's arange(T, 0, -T/n): it steps by the difference of its first two values
            steps = sorted({round(T + k * delta) - 1 for k in range(n)})
        elif spacing == "linspace":
            steps = [round(k * ((T - 1) / (n - 1))) if n > 1 else 0 for k in range(n)]
        else:
            raise ValueError(f"unknown spacing={spacing!r}; expected 'leading', 'trailing' or 'linspace'")
        if steps[-1] > T - 1 or steps[0] < 0:
            raise ValueError(f"steps_offset={steps_offset} puts timesteps outside [0, {T - 1}]")
        end = -1 if set_alpha_to_one else 0
        times = sorted(set(steps) | {end}, reverse=True)
        if len(times) < 2:
            raise ValueError(
                f"n={n} with spacing={spacing!r} gives the single time {times[0]} (its one step, to the end point "
                "it starts at, is the identity): use n >= 2, steps_offset=1 or set_alpha_to_one=True"
            )
        return torch.tensor(times, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"DiscreteVP(T={self.num_train_timesteps})"


def _cosine_betas(T: int, max_beta: float = 0.999) -> torch.Tensor:
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)


class VP(Schedule):
    """Continuous variance-preserving SDE (Song et al. 2021) with linear ``beta(t)``, ``t`` in [0, 1].

    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``, ``sigma = sqrt(1 - alpha^2)``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (0 < beta_min < beta_max):
            raise ValueError(f"need 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        self.t_min, self.t_max = 0.0, 1.0

    def _at(self, t: float) -> Coefficients:
        log_alpha = -0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min
        alpha = math.exp(log_alpha)
        sigma = math.sqrt(-math.expm1(2.0 * log_alpha))
        dalpha = -0.5 * (self.beta_min + t * (self.beta_max - self.beta_min)) * alpha
        dsigma = -alpha * dalpha / sigma if sigma > 0 else math.inf
        return Coefficients(alpha, sigma, dalpha, dsigma)

    def timesteps(self, n: int, *, eps: float = 1e-3) -> torch.Tensor:
        """``n`` uniform steps from ``t = 1`` to ``t = eps``: ``n + 1`` float64 times."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not (0 <= eps < 1):
            raise ValueError(f"eps must lie in [0, 1), got {eps}")
        return torch.linspace(1.0, eps, n + 1, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"VP(beta_min={self.beta_min}, beta_max={self.beta_max})"


class EDM(Schedule):
    """Variance exploding in EDM's parametrisation (Karras et al. 2022): ``alpha = 1``, ``sigma = t``."""

    def __init__(self, sigma_max: float = 80.0):
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max must be finite and > 0, got {sigma_max}")
        self.t_min, self.t_max = 0.0, float(sigma_max)

    def _at(self, t: float) -> Coefficients:
        return Coefficients(1.0, t, 0.0, 1.0)

    def timesteps(
        self, n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, final_zero: bool = True
    ) -> torch.Tensor:
        """Karras et al.'s grid (their eq. 5): ``n`` sigmas from sigma_max to sigma_min, then 0.

        ``final_zero=False`` leaves out the trailing 0 (useful for inversion, which must start at sigma > 0
        for models that predict x0).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2 (the grid includes both sigma_max and sigma_min), got {n!r}")
        if not (0 < sigma_min < sigma_max <= self.t_max):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max <= {self.t_max}, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        i = torch.arange(n, dtype=torch.float64)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        t = (hi + i / (n - 1) * (lo - hi)) ** rho
        return torch.cat([t, t.new_zeros(1)]) if final_zero else t

    def __repr__(self) -> str:
        return f"EDM(sigma_max={self.t_max})"


class Flow(Schedule):
    """Rectified flow (SD3, Flux): ``alpha = 1 - t``, ``sigma = t``, ``t`` in [0, 1]."""

    t_min, t_max = 0.0, 1.0

    def _at(self, t: float) -> Coefficients:
        return Coefficients(1.0 - t, t, -1.0, 1.0)

    def timesteps(self, n: int, *, shift: float = 1.0) -> torch.Tensor:
        """``n`` steps uniform in ``u`` from 1 to 0, warped by SD3's time shift
        ``t = shift u / (1 + (shift - 1) u)`` (``shift > 1`` spends more steps at high noise)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be finite and > 0, got {shift}")
        u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
        return shift * u / (1.0 + (shift - 1.0) * u)

    def __repr__(self) -> str:
        return "Flow()"
