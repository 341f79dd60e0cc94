"""diffusers integration: BDIA (Zhang, Lewis & Kleijn, ECCV 2024) inside diffusers pipelines.

- ``schedulers``: ``BDIAScheduler`` (``DDIMScheduler``'s configuration plus ``gamma``) and its inverse
  ``BDIAInverseScheduler``; ``BDIAFlowMatchScheduler`` (``FlowMatchEulerDiscreteScheduler``'s configuration plus
  ``gamma``: SD3, SD3.5, Flux). One walk over one base; a family only says what its configuration means.
- ``adapters``: ``schedule_from`` (a bdia schedule equal to a scheduler's), ``timesteps_from`` (the grid its
  ``set_timesteps`` walks, end point included) and ``model_from`` (a ``bdia.models.Model`` over a diffusers
  network), for research code that drives ``bdia.sample`` / ``bdia.invert`` itself.
- ``pipelines``: ``invert`` / ``sample`` (exact inversion and editing) and ``encode`` / ``decode`` (the VAE as the
  pipeline uses it) through Stable Diffusion 1/2, SDXL, SD3 / SD3.5 and Flux pipelines, with their own guidance
  and conditioning, one network call per step (two for Flux's true CFG, as its pipeline makes them).
- ``tiny``: those pipelines (and a Wan video pipeline) with tiny random weights, built offline (tests, examples,
  benchmarks).

This package imports diffusers (``pip install "bdia[diffusers]"``); ``import bdia`` never imports it.
See docs/diffusers.md for what maps to what and what is refused.
"""

from __future__ import annotations

try:
    import diffusers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('bdia.diffusers needs diffusers: pip install "bdia[diffusers]"') from e

from bdia.diffusers.adapters import model_from, schedule_from, timesteps_from
from bdia.diffusers.pipelines import FAMILIES, Family, decode, encode, family_of, invert, sample
from bdia.diffusers.schedulers import (
    BDIAFlowMatchScheduler,
    BDIAInverseScheduler,
    BDIAScheduler,
    BDIASchedulerOutput,
)
from bdia.diffusers.tiny import (
    tiny_flux_pipeline,
    tiny_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_wan_pipeline,
)

__all__ = [
    "FAMILIES",
    "BDIAFlowMatchScheduler",
    "BDIAInverseScheduler",
    "BDIAScheduler",
    "BDIASchedulerOutput",
    "Family",
    "decode",
    "encode",
    "family_of",
    "invert",
    "model_from",
    "sample",
    "schedule_from",
    "timesteps_from",
    "tiny_flux_pipeline",
    "tiny_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_wan_pipeline",
]
