"""A diffusers scheduler's schedule and grid, and a diffusers network, in bdia's terms.

``schedule_from`` (a bdia schedule equal to a scheduler's), ``timesteps_from`` (the grid its ``set_timesteps``
walks, end point included) and ``model_from`` (a ``bdia.models.Model`` over a diffusers network), for research code
that drives ``bdia.sample`` / ``bdia.invert`` itself; the schedulers and pipeline functions of this package are
built on the same three.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Callable
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from bdia.models import CFG, Model, Prediction
from bdia.schedules import DiscreteVP, Flow, Schedule, check_grid

__all__ = ["model_from", "schedule_from", "timesteps_from"]

# diffusers' prediction types and the bdia parametrisation each one is
_PREDICTIONS = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v"}


def schedule_from(scheduler: Any) -> Schedule:
    """The bdia schedule of a diffusers scheduler, in float64.

    Any scheduler with ``alphas_cumprod`` (DDIM, DDIMInverse, DDPM, PNDM, Euler, DPM-Solver, ...) gives a
    ``DiscreteVP`` over that very table (the scheduler's float32 numbers, held in float64), so that
    ``alpha(t)^2`` is ``alphas_cumprod[t]`` at every training timestep and ``t = -1`` is alpha = 1.
    ``FlowMatchEulerDiscreteScheduler`` gives ``Flow()``: its shift (static or dynamic) warps the grid, not the
    schedule, and lives in ``timesteps_from``. bdia's own schedulers give their ``schedule``.
    """
    own = getattr(scheduler, "schedule", None)
    if isinstance(own, Schedule):
        return own
    if _is_flow(scheduler):
        if scheduler.config.get("invert_sigmas", False):
            raise ValueError(
                "schedule_from: a flow scheduler with invert_sigmas=True (sigma running 0 -> 1) is not supported"
            )
        return Flow()
    config = getattr(scheduler, "config", {})
    if config.get("use_flow_sigmas", False) or config.get("prediction_type") == "flow_prediction":
        raise ValueError(
            f"schedule_from: {type(scheduler).__name__} is configured for flow matching (use_flow_sigmas / "
            "flow_prediction): use FlowMatchEulerDiscreteScheduler's configuration for flow models"
        )
    abar = getattr(scheduler, "alphas_cumprod", None)
    if not isinstance(abar, torch.Tensor):
        raise TypeError(
            "scheduler must be a diffusers scheduler with an alphas_cumprod table (DDIM, DDPM, PNDM, Euler, "
            f"DPM-Solver, ...) or a FlowMatchEulerDiscreteScheduler; got {type(scheduler).__name__}"
        )
    return DiscreteVP(abar.detach().to("cpu", torch.float64))


def timesteps_from(
    scheduler: Any, num_inference_steps: int, *, mu: float | None = None, sigmas: Any = None
) -> torch.Tensor:
    """The time grid (float64, noisiest first) that ``scheduler.set_timesteps(num_inference_steps)`` walks, with
    its end point, in the native time of ``schedule_from(scheduler)``. The scheduler itself is left alone.

    Discrete schedulers: their (distinct) timesteps, then the end point their last step goes to: ``t = 0``
    (``abar[0]``, e.g. ``set_alpha_to_one=False``) or ``t = -1`` (alpha = 1). Where the last timestep already is
    the end point, the grid ends there (diffusers' last step is then the identity). Flow schedulers: their sigmas,
    terminal 0 included, as their ``set_timesteps(num_inference_steps, sigmas=sigmas, mu=mu)`` makes them
    (``num_inference_steps`` may be None when ``sigmas`` are given); ``mu``
    is required under dynamic shifting (``use_dynamic_shifting=True``), as it is for their ``set_timesteps``: it
    depends on the image size, so pass the pipeline's.
    """
    grid = getattr(scheduler, "grid", None)
    if isinstance(getattr(scheduler, "schedule", None), Schedule) and callable(grid):  # one of bdia's schedulers
        extra = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
        return grid(num_inference_steps, **extra)
    schedule = schedule_from(scheduler)  # validates the kind of scheduler
    if _is_flow(scheduler):
        return flow_grid(scheduler.config, num_inference_steps, sigmas=sigmas, mu=mu)[0]
    _check_steps(num_inference_steps)
    if mu is not None or sigmas is not None:
        raise ValueError("timesteps_from: mu and sigmas are only for flow schedulers")
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_inference_steps)
    steps = fresh.timesteps.to("cpu", torch.float64)
    # a negative timestep is numpy's arange overshooting in 'trailing' spacing (n = 61, 103, ... of 1000):
    # DDIMScheduler then indexes alphas_cumprod[-1], the noisiest entry; it is no point of the walk
    steps = steps[steps >= 0]
    times = torch.cat([steps, torch.tensor([_end_time(fresh, schedule)], dtype=torch.float64)])
    times = torch.unique(times).flip(0)  # distinct and noisiest first (PNDM repeats timesteps; inverse ones rise)
    return times.to(torch.float64)


def _check_steps(num_inference_steps: Any) -> None:
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")


@functools.cache
def _flow_keys() -> frozenset[str]:
    return frozenset(inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters) - {"self", "kwargs"}


_REFERENCE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _reference(config: tuple) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' scheduler for a configuration (building one costs more than setting its timesteps)."""
    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def flow_grid(
    config: Any,
    num_inference_steps: int | None,
    *,
    sigmas: Any = None,
    mu: float | None = None,
    timesteps: Any = None,
    device: str | torch.device | None = None,
    shift: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``FlowMatchEulerDiscreteScheduler``'s own grid for a configuration: ``(grid, sigmas, timesteps)``.

    ``sigmas`` and ``timesteps`` are what its ``set_timesteps(num_inference_steps, device, sigmas, mu, timesteps)``
    makes (float32, the terminal sigma included; ``timesteps`` are the values a pipeline passes to the network and
    to ``step``), computed by diffusers' own code so that every option it has (static ``shift``, dynamic shifting
    with ``mu``, ``shift_terminal``, Karras / exponential / beta sigmas, custom ``sigmas`` or ``timesteps``) gives
    its very grid; ``grid`` is those sigmas held in float64 (exactly the float32 values), noisiest first.
    ``shift``: a shift set later by ``set_shift`` (the grid's end still comes from the configured one, as in
    diffusers).
    """
    if config.get("use_dynamic_shifting", False):
        if mu is None:
            raise ValueError(
                "this flow scheduler uses dynamic shifting, whose amount depends on the image size: pass mu= "
                "(the value the pipeline passes to set_timesteps)"
            )
    elif mu is not None:
        raise ValueError("mu is only used under dynamic shifting (use_dynamic_shifting=True)")
    if num_inference_steps is not None:
        _check_steps(num_inference_steps)
    elif sigmas is None and timesteps is None:
        raise ValueError("give num_inference_steps, sigmas or timesteps")
    own = tuple(sorted((k, v) for k, v in config.items() if k in _flow_keys()))
    with _REFERENCE_LOCK:  # (one reference scheduler per configuration, reused: set_timesteps rewrites its grid)
        reference = _reference(own)
        reference.set_shift(reference.config.shift if shift is None else shift)
        reference.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        made = reference.sigmas, reference.timesteps
    grid = made[0].to("cpu", torch.float64)
    check_grid(grid, Flow(), name="the flow grid (the sigmas set_timesteps made, terminal sigma included)")
    return grid, made[0], made[1]


def _end_time(s: Any, schedule: DiscreteVP) -> float:
    """Where a discrete scheduler's last step lands: alpha = 1 (t = -1) or abar[0] (t = 0)."""
    if hasattr(s, "final_alpha_cumprod"):  # DDIM, PNDM
        abar = float(s.final_alpha_cumprod)
    elif hasattr(s, "initial_alpha_cumprod"):  # DDIMInverse: where its walk starts
        abar = float(s.initial_alpha_cumprod)
    elif isinstance(
        getattr(s, "sigmas", None), torch.Tensor
    ):  # Euler, DPM-Solver, ...: sigma = sqrt((1 - abar) / abar)
        abar = 1.0 / (1.0 + float(s.sigmas[-1]) ** 2)
    else:  # DDPM: its last step goes to alpha = 1
        abar = 1.0
    if abar == 1.0:
        return -1.0
    if math.isclose(abar, schedule.at(0.0).alpha ** 2, rel_tol=1e-5):
        return 0.0
    raise ValueError(f"{type(s).__name__} ends its walk at alphas_cumprod = {abar}, which is neither 1 nor abar[0]")


def _is_flow(scheduler: Any) -> bool:
    return isinstance(getattr(scheduler, "schedule", None), Flow) or type(scheduler).__name__.startswith("FlowMatch")


# How a network takes its time. ``t`` is the grid time as bdia.models.Model passes it (a (batch,) tensor); each
# convention gives the network exactly the value its pipeline gives it.


def discrete_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """UNets of discrete schedules: the training timestep itself (981.0 embeds as the integer 981 does)."""
    return t


def flow_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Flow transformers (SD3, Wan): ``1000 sigma`` in float32, which is FlowMatchEulerDiscreteScheduler's
    ``timesteps`` (``sigmas * num_train_timesteps``, float32) to the bit."""
    return t.to(torch.float32) * 1000.0


def flux_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Flux's transformer multiplies its timestep by 1000 inside: its pipeline passes the scheduler's timestep,
    cast to the latents' dtype, divided by 1000."""
    return flow_timestep(t, x).to(x.dtype) / 1000.0


def _timestep_of(net: Any, scheduler: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The time convention of ``net`` under ``scheduler``: Flux's transformer's, a flow network's or a UNet's."""
    if not _is_flow(scheduler):
        return discrete_timestep
    import diffusers

    flux = getattr(diffusers, "FluxTransformer2DModel", None)
    return flux_timestep if flux is not None and isinstance(net, flux) else flow_timestep


class _Net:
    """A diffusers network seen as a bdia net ``net(x, t, **kw) -> Tensor``: ``t`` (the schedule's native time)
    goes in as the keyword ``timestep``, converted by ``timestep(t, x)`` to what the network takes, and a
    ``UNet2DOutput``-style return is unwrapped to its tensor."""

    def __init__(self, module: Callable[..., Any], timestep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        if not callable(module):
            raise TypeError(f"net must be a callable diffusers model, got {type(module).__name__}")
        self.module, self.timestep = module, timestep

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = self.module(x, timestep=self.timestep(t, x), **kw)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(getattr(out, "sample", None), torch.Tensor):
            return out.sample
        if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise TypeError(f"the network returned {type(out).__name__}; expected a tensor or an output with .sample")

    def __repr__(self) -> str:
        return type(self.module).__name__


class _ProcessedX0(Model):
    """A ``Model`` whose x0 goes through diffusers' ``clip_sample`` or dynamic thresholding.

    Either is a deterministic function of the network's answer at ``x``, so a BDIA step stays
    ``x_next = gamma x_prev + F(x)`` and exactly invertible; they only change what ``F`` is.
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: Schedule, prediction: str, x0: Callable, **kw: Any):
        super().__init__(net, schedule, prediction, **kw)
        self.process_x0 = x0

    def __call__(self, x: torch.Tensor, t: float, **kwargs: Any) -> Prediction:
        pred = super().__call__(x, t, **kwargs)
        return Prediction(self.process_x0(pred.x0), pred.eps)


def _clip(limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x0: x0.clamp(-limit, limit)


def _threshold(ratio: float, max_value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dynamic thresholding (Saharia et al. 2022, Imagen, section 2.3): per sample, ``s`` is the ``ratio``
    quantile of ``|x0|`` held in ``[1, max_value]``; x0 is clamped to ``[-s, s]`` and divided by ``s``."""

    def threshold(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # quantile needs these
        s = torch.quantile(work.abs(), ratio, dim=1).clamp(1.0, max_value)[:, None]
        return (work.clamp(-s, s) / s).to(x0.dtype).reshape(x0.shape)

    return threshold


def model_from(
    net: Callable[..., Any],
    scheduler: Any,
    *,
    guidance_scale: float | None = None,
    time_dtype: torch.dtype | None = None,
    **uncond: Any,
) -> Model:
    """A ``bdia.models.Model`` over a diffusers network, configured by the scheduler it was trained with.

    ``net`` is called as ``net(x, timestep=t_batch, **conditioning)`` with ``t_batch`` a 1-D tensor of the
    timesteps its pipeline gives it (``UNet2DModel``, ``UNet2DConditionModel`` with ``encoder_hidden_states`` /
    ``added_cond_kwargs``, ``SD3Transformer2DModel`` with ``encoder_hidden_states`` / ``pooled_projections``,
    ``FluxTransformer2DModel`` with its ids and ``guidance``); its ``.sample`` is unwrapped. The prediction type
    comes from the config (``epsilon``, ``sample``, ``v_prediction``; a flow scheduler's network predicts the
    velocity ``eps - x0`` at timestep ``1000 t`` in float32, and Flux's transformer, which multiplies by 1000
    itself, at ``t``), as do ``clip_sample`` and ``thresholding``, applied to x0 as the scheduler does. With
    ``guidance_scale`` and the unconditional keywords (``encoder_hidden_states=negative_embeds``),
    classifier-free guidance runs through ``bdia.models.CFG``: one batched network call per evaluation.
    """
    adapted: Callable[..., torch.Tensor] = _Net(net, _timestep_of(net, scheduler))
    if guidance_scale is not None:
        adapted = CFG(adapted, guidance_scale, **uncond)
    elif uncond:
        raise ValueError(f"unconditional keywords {sorted(uncond)} were given without guidance_scale")
    return model_over(adapted, scheduler, time_dtype=time_dtype)


def model_over(net: Callable[..., torch.Tensor], scheduler: Any, *, time_dtype: torch.dtype | None = None) -> Model:
    """The ``Model`` of a network already adapted to bdia's ``net(x, t, **kw)`` (``_Net``, maybe guided): the
    scheduler's schedule, prediction type and x0 processing."""
    schedule = schedule_from(scheduler)
    config = scheduler.config
    if isinstance(schedule, Flow):
        prediction = "velocity"
    else:
        kind = config.get("prediction_type", "epsilon")
        if kind not in _PREDICTIONS:
            raise ValueError(f"the scheduler's prediction_type={kind!r} is not one of {sorted(_PREDICTIONS)}")
        prediction = _PREDICTIONS[kind]
    if config.get("thresholding", False):
        x0 = _threshold(config["dynamic_thresholding_ratio"], config["sample_max_value"])
    elif config.get("clip_sample", False):
        x0 = _clip(config["clip_sample_range"])
    else:
        return Model(net, schedule, prediction, time_dtype=time_dtype)
    return _ProcessedX0(net, schedule, prediction, x0, time_dtype=time_dtype)
