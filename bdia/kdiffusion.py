"""BDIA in k-diffusion's sampler convention (Karras et al. 2022, "Elucidating the design space of diffusion-based
generative models"): a drop-in for code that calls ``k_diffusion.sampling.sample_euler`` and its kin.

``sample_bdia(model, x, sigmas, extra_args, callback, disable)`` takes what k-diffusion's samplers take: a Karras
denoiser ``model(x, sigma, **extra_args) -> x0`` (``sigma`` of shape ``(batch,)``), a latent at ``sigmas[0]`` and a
1-D tensor of sigmas from the largest down to (usually) 0. It runs BDIA (Zhang, Lewis & Kleijn, ECCV 2024) over
Euler or Heun in EDM's frame (alpha = 1, sigma = t) and returns the final latent; ``invert_bdia`` walks the same
sigmas backwards. Neither imports k-diffusion. See docs/kdiffusion.md.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bdia.models import Model
from bdia.sampling import Step, invert, sample
from bdia.schedules import EDM
from bdia.solvers import BDIA, Euler, GammaFn, Integrator
from bdia.state import State

__all__ = ["invert_bdia", "sample_bdia"]

KarrasDenoiser = Callable[..., torch.Tensor]
KCallback = Callable[[dict[str, Any]], Any]


def sample_bdia(
    model: KarrasDenoiser,
    x: torch.Tensor | State,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    gamma: float | torch.Tensor | GammaFn = 1.0,
    integrator: Integrator | None = None,
    *,
    backward: Integrator | None = None,
    return_state: bool = False,
    max_amplification: float | None = None,
) -> torch.Tensor | State:
    """BDIA from ``sigmas[0]`` down to ``sigmas[-1]``; returns the final latent, like ``k_diffusion.sampling``.

    ``x``: a latent at ``sigmas[0]`` (already scaled by it, as for k-diffusion), or the ``bdia.State`` that
    ``invert_bdia(..., return_state=True)`` returned over the same sigmas (its pair is continued: the data comes
    back exactly). ``integrator``: ``Euler()`` (default; 1 model call per step, ``sample_euler``'s cost) or
    ``Heun()`` (2 per step, 1 on a last step to sigma = 0, ``sample_heun``'s cost). ``backward``: BDIA's backward
    step, by default the integrator's first-order one (Euler: no extra model call, but BDIA over Heun is then first
    order; ``backward=Heun()`` makes it second order at 3 calls per step). ``gamma`` as in ``bdia.solvers.BDIA``: 0
    is the plain integrator, 1 the exactly invertible default.
    ``callback`` gets k-diffusion's dict once per step, about the step's first model call: ``x`` (the latent at
    ``sigmas[i]`` that was denoised), ``i``, ``sigma`` = ``sigma_hat`` = ``sigmas[i]`` (no churn), ``denoised``.
    ``disable`` turns tqdm's bar off (None: off when stderr is not a terminal, as tqdm does).
    ``return_state=True`` returns the ``bdia.State`` pair instead, which ``invert_bdia`` needs to invert exactly
    from a last sigma of 0. ``max_amplification`` as in ``bdia.sample``: BDIA with gamma = 1 carries the rounding of
    its first, sigma-80-sized latents undamped to the clean end, which in float16 or bfloat16 is the size of the data
    itself; such walks are refused unless it is lifted (docs/kdiffusion.md). Runs under ``torch.no_grad()``, as
    k-diffusion's samplers do.
    """
    walk = _Walk(model, x, sigmas, extra_args, callback, disable, gamma, integrator, backward)
    return walk.run(sample, return_state, max_amplification)


def invert_bdia(
    model: KarrasDenoiser,
    x: torch.Tensor | State,
    sigmas: torch.Tensor,
    extra_args: Mapping[str, Any] | None = None,
    callback: KCallback | None = None,
    disable: bool | None = None,
    gamma: float | torch.Tensor | GammaFn = 1.0,
    integrator: Integrator | None = None,
    *,
    backward: Integrator | None = None,
    return_state: bool = False,
    max_amplification: float | None = None,
) -> torch.Tensor | State:
    """The inverse of ``sample_bdia``: from ``sigmas[-1]`` up to ``sigmas[0]``; returns the latent at ``sigmas[0]``.

    ``x``: the ``bdia.State`` that ``sample_bdia(..., return_state=True)`` returned over the same sigmas (then
    the noise comes back to rounding, for gamma > 0), or data at ``sigmas[-1] > 0`` (a real image: its first
    step is one plain integrator step, the only approximation; at sigma = 0 that step takes ``x0 = x`` and the noise
    the denoiser predicts at ``sigmas[-2]``, see ``bdia.integrators``). Sample again from the inverted pair with
    ``return_state=True`` and ``sample_bdia(model, state, sigmas, ...)``; a bare latent drops the pair and with
    it exactness. The other arguments, and the callback dict (``i`` now counts down), as in ``sample_bdia``.
    """
    walk = _Walk(model, x, sigmas, extra_args, callback, disable, gamma, integrator, backward)
    return walk.run(invert, return_state, max_amplification)


class _Walk:
    """The arguments checked and mapped to bdia: the grid, the EDM-frame model over the user's denoiser, the solver,
    and bdia's callback that hands k-diffusion's dict to the user's."""

    def __init__(self, model, x, sigmas, extra_args, callback, disable, gamma, integrator, backward):
        self.grid = _grid(sigmas)
        if not callable(model):
            raise TypeError(
                f"model must be a Karras denoiser model(x, sigma, **extra_args) -> x0, got {type(model).__name__}"
            )
        if extra_args is None:
            extra_args = {}
        if not isinstance(extra_args, Mapping):
            raise TypeError(
                f"extra_args must be a dict of keyword arguments for the model, got {type(extra_args).__name__}"
            )
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable with k-diffusion's dict, got {type(callback).__name__}")
        if disable is not None and not isinstance(disable, bool):
            raise TypeError(f"disable must be a bool or None, got {type(disable).__name__}")
        self.solver = BDIA(Euler() if integrator is None else integrator, gamma, backward)
        latent = x.x if isinstance(x, State) else x
        time_dtype = latent.dtype if isinstance(latent, torch.Tensor) else None  # otherwise the walk names the error
        self.denoiser = _Net(model, extra_args)
        # EDM's frame: alpha = 1, sigma = t, and a network that predicts x0 ("sample"); the net sees sigma in the
        # latent's dtype, as k-diffusion's sigma * s_in with s_in = x.new_ones([batch]) gives it
        self.model = Model(self.denoiser, EDM(sigma_max=self.grid[0]), "sample", time_dtype=time_dtype)
        self.x, self.sigmas, self.callback = x, sigmas, callback
        self.index = {t: i for i, t in enumerate(self.grid)}
        self.progress = (not disable) if disable is not None else _is_terminal(sys.stderr)

    def report(self, step: Step) -> None:
        i = self.index[step.t]  # the step's start, where its first evaluation was
        s = self.sigmas[i]
        self.callback({"x": step.x, "i": i, "sigma": s, "sigma_hat": s, "denoised": step.x0})

    def run(self, walk: Callable[..., State], return_state: bool, limit: float | None) -> torch.Tensor | State:
        ts = torch.tensor(self.grid, dtype=torch.float64)
        report = None if self.callback is None else self.report
        with torch.no_grad():
            out = walk(
                self.model, self.x, ts, self.solver, progress=self.progress, callback=report, max_amplification=limit
            )
        return out if return_state else out.x


def _grid(sigmas: object) -> list[float]:
    """k-diffusion's sigmas (any float dtype, any device) as bdia's float64 time grid, as python floats."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor (largest first), got {type(sigmas).__name__}")
    if not sigmas.is_floating_point():
        raise TypeError(f"sigmas must be a floating-point tensor, got {sigmas.dtype}")
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(sigmas.shape)}")
    grid = sigmas.detach().to(device="cpu", dtype=torch.float64).tolist()  # float32 -> float64 is exact
    if not all(math.isfinite(s) and s >= 0 for s in grid):
        raise ValueError(f"sigmas must be finite and non-negative, got {grid}")
    if not all(a > b for a, b in itertools.pairwise(grid)):
        raise ValueError(f"sigmas must be strictly decreasing (largest first), got {grid}")
    return grid


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Net:
    """The user's denoiser as a bdia network ``net(x, sigma)``, with its ``extra_args``."""

    def __init__(self, model: KarrasDenoiser, extra_args: Mapping[str, Any]):
        self.model, self.extra_args = model, extra_args

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model(x, sigma, **self.extra_args)
