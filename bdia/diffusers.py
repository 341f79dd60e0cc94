"""diffusers integration: BDIA (Zhang, Lewis & Kleijn, ECCV 2024) inside diffusers pipelines.

- ``BDIAScheduler``: a diffusers scheduler, configured like ``DDIMScheduler`` plus ``gamma``, whose ``step`` is
  ``bdia.solvers.BDIA(DDIM(), gamma).step`` on a pair of latents kept inside the scheduler; its inverse
  counterpart ``BDIAInverseScheduler`` walks the same grid backwards with ``BDIA.unstep``.
- Adapters for research code that drives ``bdia.sample`` / ``bdia.invert`` itself: ``schedule_from`` (a bdia
  schedule equal to a scheduler's), ``timesteps_from`` (the grid its ``set_timesteps`` walks, end point included)
  and ``model_from`` (a ``bdia.models.Model`` over a diffusers network).
- ``invert`` / ``sample``: exact inversion and editing through a Stable Diffusion pipeline, with classifier-free
  guidance in one batched network call per step.

This module imports diffusers (``pip install "bdia[diffusers]"``); ``import bdia`` never imports it.
See docs/diffusers.md for what maps to what and what is refused.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

try:
    import diffusers
    from diffusers import ConfigMixin, DDIMScheduler, SchedulerMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.utils import BaseOutput
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('bdia.diffusers needs diffusers: pip install "bdia[diffusers]"') from e

import bdia
from bdia import State
from bdia.models import CFG, Model, Prediction
from bdia.sampling import Step
from bdia.schedules import DiscreteVP, Flow, Schedule
from bdia.solvers import BDIA, DDIM

__all__ = [
    "BDIAInverseScheduler",
    "BDIAScheduler",
    "BDIASchedulerOutput",
    "invert",
    "model_from",
    "sample",
    "schedule_from",
    "timesteps_from",
    "tiny_pipeline",
]

# diffusers' prediction types and the bdia parametrisation each one is
_PREDICTIONS = {"epsilon": "epsilon", "sample": "sample", "v_prediction": "v"}

# Schedulers whose configuration means what DDIMScheduler's means: betas over discrete training timesteps and a
# timestep spacing. Their configs are accepted by from_config (their other keys are dropped, as diffusers does).
_DDIM_LIKE = [
    "DDIMScheduler",
    "DDIMInverseScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DPMSolverSDEScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "BDIAScheduler",
    "BDIAInverseScheduler",
]
# Keys of those schedulers' configs that replace the timestep-spacing grid by another one (or the discrete
# schedule by a flow): a config that turns one on asks for a grid that BDIAScheduler does not walk.
_OTHER_GRIDS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "timestep_type": "discrete",
}


# --------------------------------------------------------------------------------------------- adapters


def schedule_from(scheduler: Any) -> Schedule:
    """The bdia schedule of a diffusers scheduler, in float64.

    Any scheduler with ``alphas_cumprod`` (DDIM, DDIMInverse, DDPM, PNDM, Euler, DPM-Solver, ...) gives a
    ``DiscreteVP`` over that very table (the scheduler's float32 numbers, held in float64), so that
    ``alpha(t)^2`` is ``alphas_cumprod[t]`` at every training timestep and ``t = -1`` is alpha = 1.
    ``FlowMatchEulerDiscreteScheduler`` gives ``Flow()``: its shift (static or dynamic) warps the grid, not the
    schedule, and lives in ``timesteps_from``.
    """
    if isinstance(scheduler, _BDIASchedulerBase):
        return scheduler.schedule
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


def timesteps_from(scheduler: Any, num_inference_steps: int, *, mu: float | None = None) -> torch.Tensor:
    """The time grid (float64, noisiest first) that ``scheduler.set_timesteps(num_inference_steps)`` walks, with
    its end point, in the native time of ``schedule_from(scheduler)``. The scheduler itself is left alone.

    Discrete schedulers: their (distinct) timesteps, then the end point their last step goes to: ``t = 0``
    (``abar[0]``, e.g. ``set_alpha_to_one=False``) or ``t = -1`` (alpha = 1). Where the last timestep already is
    the end point, the grid ends there (diffusers' last step is then the identity). Flow schedulers: their sigmas,
    terminal 0 included; ``mu`` is required under dynamic shifting (``use_dynamic_shifting=True``), as it is for
    their ``set_timesteps``: it depends on the image size, so pass the pipeline's.
    """
    if isinstance(scheduler, _BDIASchedulerBase):
        return scheduler.grid(num_inference_steps)
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    schedule = schedule_from(scheduler)  # validates the kind of scheduler
    fresh = type(scheduler).from_config(scheduler.config)
    if _is_flow(scheduler):
        if scheduler.config.get("use_dynamic_shifting", False):
            if mu is None:
                raise ValueError(
                    "timesteps_from: this flow scheduler uses dynamic shifting, whose amount depends on the image "
                    "size: pass mu= (the value the pipeline passes to set_timesteps)"
                )
            fresh.set_timesteps(num_inference_steps, mu=mu)
        else:
            if mu is not None:
                raise ValueError("timesteps_from: mu is only used under dynamic shifting (use_dynamic_shifting=True)")
            fresh.set_timesteps(num_inference_steps)
        times = fresh.sigmas.to(torch.float64)
    else:
        if mu is not None:
            raise ValueError("timesteps_from: mu is only for flow schedulers with dynamic shifting")
        fresh.set_timesteps(num_inference_steps)
        steps = fresh.timesteps.to("cpu", torch.float64)
        # a negative timestep is numpy's arange overshooting in 'trailing' spacing (n = 61, 103, ... of 1000):
        # DDIMScheduler then indexes alphas_cumprod[-1], the noisiest entry; it is no point of the walk
        steps = steps[steps >= 0]
        times = torch.cat([steps, torch.tensor([_end_time(fresh, schedule)], dtype=torch.float64)])
    times = torch.unique(times).flip(0)  # distinct and noisiest first (PNDM repeats timesteps; inverse ones rise)
    return times.to(torch.float64)


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
    return type(scheduler).__name__.startswith("FlowMatch")


class _Net:
    """A diffusers network seen as a bdia net ``net(x, t, **kw) -> Tensor``: ``t`` (the schedule's native time)
    goes in as the keyword ``timestep``, scaled to the network's timesteps (flow models take ``1000 t``), and a
    ``UNet2DOutput``-style return is unwrapped to its tensor."""

    def __init__(self, module: Callable[..., Any], scale: float = 1.0):
        if not callable(module):
            raise TypeError(f"net must be a callable diffusers model, got {type(module).__name__}")
        self.module, self.scale = module, scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        out = self.module(x, timestep=t if self.scale == 1.0 else t * self.scale, **kw)
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
    scheduler's timesteps (``UNet2DModel``, ``UNet2DConditionModel`` with ``encoder_hidden_states`` /
    ``added_cond_kwargs``, ``SD3Transformer2DModel`` with ``encoder_hidden_states`` / ``pooled_projections``);
    its ``.sample`` is unwrapped. The prediction type comes from the config (``epsilon``, ``sample``,
    ``v_prediction``; a flow scheduler's network predicts the velocity ``eps - x0`` at timestep ``1000 t``), as do
    ``clip_sample`` and ``thresholding``, applied to x0 as the scheduler does. With ``guidance_scale`` and the
    unconditional keywords (``encoder_hidden_states=negative_embeds``), classifier-free guidance runs through
    ``bdia.models.CFG``: one batched network call per evaluation.
    """
    schedule = schedule_from(scheduler)
    config = scheduler.config
    if isinstance(schedule, Flow):
        prediction, scale = "velocity", float(config["num_train_timesteps"])
    else:
        kind = config.get("prediction_type", "epsilon")
        if kind not in _PREDICTIONS:
            raise ValueError(f"the scheduler's prediction_type={kind!r} is not one of {sorted(_PREDICTIONS)}")
        prediction, scale = _PREDICTIONS[kind], 1.0
    adapted: Callable[..., torch.Tensor] = _Net(net, scale)
    if guidance_scale is not None:
        adapted = CFG(adapted, guidance_scale, **uncond)
    elif uncond:
        raise ValueError(f"unconditional keywords {sorted(uncond)} were given without guidance_scale")
    if config.get("thresholding", False):
        x0 = _threshold(config["dynamic_thresholding_ratio"], config["sample_max_value"])
    elif config.get("clip_sample", False):
        x0 = _clip(config["clip_sample_range"])
    else:
        return Model(adapted, schedule, prediction, time_dtype=time_dtype)
    return _ProcessedX0(adapted, schedule, prediction, x0, time_dtype=time_dtype)


# -------------------------------------------------------------------------------------------- schedulers


@functools.cache
def _ddim_like_keys() -> frozenset[str]:
    """Every configuration key of the DDIM-like schedulers (of the installed diffusers) and of ours."""
    keys = set(inspect.signature(_BDIASchedulerBase.__init__).parameters)
    for name in _DDIM_LIKE:
        cls = getattr(diffusers, name, None)
        if cls is not None:
            keys |= set(inspect.signature(cls.__init__).parameters)
    return frozenset(keys - {"self", "kwargs"})


@dataclass
class BDIASchedulerOutput(BaseOutput):
    """``prev_sample``: the latent the step made (the next model input); ``pred_original_sample``: the x0 estimate
    at the step's start (after ``clip_sample`` / thresholding, if configured)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class _Answer:
    """A denoiser that returns a prediction already made: a scheduler's step is given the network's output."""

    def __init__(self, schedule: Schedule, pred: Prediction):
        self.schedule, self.pred = schedule, pred

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        return self.pred


def _given_output(x: torch.Tensor, *, timestep: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    return output


def _pair(s: Any, name: str) -> State:
    if not isinstance(s, State):
        raise TypeError(f"{name} must be a bdia.State (a pair of latents and their times), got {type(s).__name__}")
    return s


class _BDIASchedulerBase(SchedulerMixin, ConfigMixin):
    """What both directions share: the config (DDIMScheduler's keys plus ``gamma``), the schedule, the grid."""

    _compatibles = _DDIM_LIKE
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        gamma: float = 1.0,
    ):
        if trained_betas is None and beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(
                f"beta_schedule={beta_schedule!r} is not one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"
            )
        # The table is DDIMScheduler's own (its float32 betas and cumulative product): every key keeps its meaning.
        table = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            set_alpha_to_one=set_alpha_to_one,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.betas, self.alphas, self.alphas_cumprod = table.betas, table.alphas, table.alphas_cumprod
        self.final_alpha_cumprod = table.final_alpha_cumprod
        self.schedule = DiscreteVP(self.alphas_cumprod.to(torch.float64))
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._check()  # what the pipeline may rewrite later is checked again in set_timesteps
        self._grid: list[float] | None = None
        self._state: State | None = None

    def _check(self) -> None:
        c = self.config
        BDIA(DDIM(), c.gamma)  # gamma's own checks: a float in [0, 1]
        if c.prediction_type not in _PREDICTIONS:
            raise ValueError(f"prediction_type={c.prediction_type!r} is not one of {sorted(_PREDICTIONS)}")
        if c.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(f"timestep_spacing={c.timestep_spacing!r} is not one of 'leading', 'trailing', 'linspace'")

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``, for the config of a DDIM-like scheduler only (betas over discrete
        timesteps: DDIM, DDPM, PNDM, Euler, DPM-Solver, ...); ``kwargs`` override it (``gamma=...``)."""
        given = dict(config or {})
        name = given.get("_class_name")
        # a config made in memory has no class name: then its keys tell (a saved DDIM-like config may carry keys
        # of older diffusers versions, which diffusers ignores)
        foreign = (
            [] if name is not None else sorted(k for k in given if not k.startswith("_") and k not in _ddim_like_keys())
        )
        if (name is not None and name not in _DDIM_LIKE) or foreign:
            what = f"{name}'s" if name is not None and name not in _DDIM_LIKE else f"one with the keys {foreign}"
            raise ValueError(
                f"{cls.__name__}.from_config needs the config of a DDIM-like scheduler (betas over discrete timesteps: "
                f"{', '.join(_DDIM_LIKE[:6])}, ...); got {what}, which no DDIM-like scheduler has"
            )
        merged = {**given, **kwargs}
        for key, plain in _OTHER_GRIDS.items():
            if merged.get(key, plain) != plain:
                raise ValueError(
                    f"the config sets {key}={merged[key]!r}, a grid {cls.__name__} does not walk (it walks "
                    f"DDIMScheduler's timestep_spacing grid): pass {key}={plain!r} to from_config to accept that grid"
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def grid(self, num_inference_steps: int) -> torch.Tensor:
        """The float64 grid that ``set_timesteps(num_inference_steps)`` walks, end point included (as
        ``bdia.schedules.DiscreteVP.timesteps``, which mirrors DDIMScheduler's spacings)."""
        c = self.config
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        if not 1 <= num_inference_steps <= c.num_train_timesteps:
            raise ValueError(f"num_inference_steps must lie in [1, {c.num_train_timesteps}], got {num_inference_steps}")
        return self.schedule.timesteps(
            num_inference_steps, c.timestep_spacing, steps_offset=c.steps_offset, set_alpha_to_one=c.set_alpha_to_one
        )

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None, state: State | None = None
    ) -> None:
        """Set the grid for ``num_inference_steps`` steps and start a new walk (the pair state is reset).

        ``state``: a pair (``bdia.State``) on this grid to continue from, e.g. ``bdia.invert``'s result or the
        other scheduler's ``state``; ``timesteps`` then lists only the steps that remain, and the first ``step``
        must be given the pair's latent at ``timesteps[0]`` (``state.x_prev`` for a pair from the other direction).
        """
        self._check()
        grid = self.grid(num_inference_steps).tolist()
        self.num_inference_steps, self._grid = num_inference_steps, grid
        self._where = {t: i for i, t in enumerate(grid)}
        self._model = model_from(_given_output, self)
        self._solver = BDIA(DDIM(), self.config.gamma)
        self._state, self._given = None, None
        if state is not None:
            self._state, self._given = self._continue(_pair(state, "state"))
        self.timesteps = torch.tensor(self._visible(), dtype=torch.int64, device=device)

    def _position(self, state: State) -> int:
        """The grid index of the pair's less noisy point; the pair must be two consecutive grid points."""
        hi, lo = max(state.t_prev, state.t), min(state.t_prev, state.t)
        i = self._where.get(lo)
        if i is None or i == 0 or self._grid[i - 1] != hi:
            g = self._grid
            raise ValueError(
                f"state holds times ({state.t_prev}, {state.t}), not two consecutive points of the grid "
                f"set_timesteps({self.num_inference_steps}) made ({g[0]}, {g[1]}, ..., {g[-1]}): pass the "
                "num_inference_steps and config of the walk that made it"
            )
        return i

    def _time(self, timestep: Any) -> tuple[float, int]:
        if self._grid is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step")
        t = float(timestep)
        i = self._where.get(t)
        if i is None:
            raise ValueError(
                f"timestep {t:g} is not on the grid set_timesteps({self.num_inference_steps}) made "
                f"({', '.join(f'{v:g}' for v in self._grid[:3])}, ..., {self._grid[-1]:g})"
            )
        return t, i

    def _predict(self, model_output: torch.Tensor, sample: torch.Tensor, t: float) -> Prediction:
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be tensors")
        return self._model(sample, t, output=model_output)

    def _check_given(self, sample: torch.Tensor) -> None:
        """The first step from a given pair must be given that pair's latent (not the other one)."""
        if self._given is not None:
            expected, self._given = self._given, None
            if sample is not expected and not torch.equal(sample, expected):
                raise ValueError(
                    "sample differs from the pair's latent at this timestep: after set_timesteps(..., state=pair) "
                    "the first step takes the pair's point at timesteps[0]"
                )

    @staticmethod
    def _check_eta(eta: float) -> None:
        if eta != 0:
            raise ValueError(
                f"eta must be 0, got {eta}: BDIA is a deterministic (probability-flow ODE) sampler; eta > 0 adds "
                "fresh noise at every step, which no inversion can recover"
            )

    @property
    def state(self) -> State | None:
        """The pair of latents the walk holds, as ``bdia.sample`` / ``bdia.invert`` return it (``x`` the latent the
        walk is at, ``x_prev`` the one before it), or None before the first step. After a pipeline run this is what
        ``invert`` needs for an exact inversion."""
        return self._state

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` per sample (the forward process at training timesteps)."""
        ts = torch.as_tensor(timesteps).flatten().tolist()
        k = [self.schedule.at(float(t)) for t in ts]
        shape = (-1, *([1] * (original_samples.dim() - 1)))
        on = {"dtype": torch.float64, "device": original_samples.device}
        alpha = torch.tensor([c.alpha for c in k], **on).reshape(shape).to(original_samples.dtype)
        sigma = torch.tensor([c.sigma for c in k], **on).reshape(shape).to(original_samples.dtype)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class BDIAScheduler(_BDIASchedulerBase):
    """BDIA-DDIM as a diffusers scheduler: ``DDIMScheduler``'s configuration plus ``gamma`` (in [0, 1]).

    ``step`` is ``bdia.solvers.BDIA(DDIM(), gamma)``: the first step of a walk is a plain DDIM step, every later one
    ``x_next = DDIM(x; t -> t_next) + gamma (x_prev - DDIM(x; t -> t_prev))``, with the pair ``(x_prev, x)`` kept
    in the scheduler (``state``) and reset by ``set_timesteps``. gamma = 0 is DDIM; gamma = 1 is exactly
    invertible with ``BDIAInverseScheduler`` or ``bdia.diffusers.invert``. Every step goes to the grid's next
    timestep (for ``linspace`` spacing this is not DDIMScheduler's ``t - T // n``; see docs/diffusers.md).
    ``clip_sample`` and ``thresholding`` act on x0 as in DDIMScheduler; they keep the step invertible.
    """

    def _visible(self) -> list[float]:
        """The timesteps a pipeline loops over: DDIMScheduler's (the model is evaluated at each). Where the last
        of them is the grid's end point its step is the identity, as it is in DDIMScheduler."""
        g, n = self._grid, self.num_inference_steps
        start = 0 if self._state is None else self._where[self._state.t]
        return g[start:n]

    def _continue(self, state: State) -> tuple[State, torch.Tensor]:
        if state.t_prev < state.t:
            state = state.flipped()
        self._position(state)
        return state, state.x

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One BDIA step from ``timestep`` to the grid's next timestep, given the network's output at ``sample``.

        ``sample`` is the current latent (the one this scheduler returned last, or one the pipeline has edited);
        the previous one comes from the pair state. The first step after ``set_timesteps`` may start at any grid
        timestep (img2img starts part way); every later one must continue the walk. ``generator`` is unused
        (nothing is random); ``eta`` must be 0.
        """
        self._check_eta(eta)
        t, i = self._time(timestep)
        pred = self._predict(model_output, sample, t)
        st = self._state
        if i == len(self._grid) - 1:  # the last timestep is the end point: nothing left to walk
            if st is not None and st.t != t:
                raise ValueError(f"timestep {t:g} does not continue the walk, which is at t = {st.t:g}")
            prev = sample
        else:
            model = _Answer(self.schedule, pred)
            if st is None:
                st = self._solver.init(model, sample, t, self._grid[i + 1])
            else:
                if st.t != t:
                    raise ValueError(
                        f"timestep {t:g} does not continue the walk, which is at t = {st.t:g}: call set_timesteps "
                        "to start a new walk"
                    )
                self._check_given(sample)
                st = self._solver.step(model, State(st.x_prev, sample, st.t_prev, st.t), self._grid[i + 1])
            self._state, prev = st, st.x
        if not return_dict:
            return prev, pred.x0
        return BDIASchedulerOutput(prev_sample=prev, pred_original_sample=pred.x0)


class BDIAInverseScheduler(_BDIASchedulerBase):
    """The inverse of ``BDIAScheduler``: the same configuration and grid, walked from the end point to the noisiest
    timestep with ``BDIA.unstep``.

    ``timesteps`` are the times at which the network is evaluated, rising (the current, noisier point of the
    inversion walk). From a lone latent at the end point (a real image's latent) the first step is one plain DDIM
    step, the only approximation; from a pair (``set_timesteps(n, state=sampler.state)``) every step is exact to
    rounding when gamma > 0 (rounding grows like gamma^-N for gamma < 1: use gamma = 1).
    """

    def _visible(self) -> list[float]:
        g = self._grid
        start = len(g) - 1 if self._state is None else self._where[self._state.t_prev]
        return g[start:0:-1]

    @property
    def state(self) -> State | None:
        # kept in sampling orientation, shown facing the inversion walk (x the noisiest latent reached), as
        # bdia.invert returns it
        return None if self._state is None else self._state.flipped()

    def _continue(self, state: State) -> tuple[State, torch.Tensor]:
        if state.t_prev < state.t:
            state = state.flipped()
        self._position(state)
        return state, state.x_prev

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None, state: State | None = None
    ) -> None:
        if self.config.gamma == 0:
            raise ValueError("gamma = 0 is plain DDIM, which BDIA cannot invert: configure gamma > 0 (1 is exact)")
        super().set_timesteps(num_inference_steps, device, state)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One inverse step from ``timestep`` (where the network was evaluated at ``sample``) to the next noisier
        grid timestep; returns the rebuilt latent there."""
        self._check_eta(eta)
        t, i = self._time(timestep)
        if i == 0:
            raise ValueError(f"timestep {t:g} is the noisiest point of the grid: the inversion walk is complete")
        pred = self._predict(model_output, sample, t)
        model, st = _Answer(self.schedule, pred), self._state
        if st is None:
            # a lone latent: one plain DDIM step towards noise, then the pair in sampling orientation
            st = self._solver.init(model, sample, t, self._grid[i - 1]).flipped()
        else:
            if st.t_prev != t:
                raise ValueError(
                    f"timestep {t:g} does not continue the inversion walk, which is at t = {st.t_prev:g}: call "
                    "set_timesteps to start a new walk"
                )
            self._check_given(sample)
            st = self._solver.unstep(model, State(sample, st.x, st.t_prev, st.t), self._grid[i - 1])
        self._state = st
        if not return_dict:
            return st.x_prev, pred.x0
        return BDIASchedulerOutput(prev_sample=st.x_prev, pred_original_sample=pred.x0)


# ------------------------------------------------------------------------------------------------ pipelines


def _walk_setup(
    pipe: Any,
    batch: int,
    device: torch.device,
    prompt: str | list[str] | None,
    negative_prompt: str | list[str] | None,
    prompt_embeds: torch.Tensor | None,
    negative_prompt_embeds: torch.Tensor | None,
    guidance_scale: float,
    num_inference_steps: int,
    gamma: float | None,
) -> tuple[Model, torch.Tensor, BDIA, dict[str, Any]]:
    """The model (with CFG when guidance_scale > 1, the pipeline's rule), the grid, the solver and the conditioning
    of a walk through a Stable Diffusion pipeline's components."""
    if prompt is None and prompt_embeds is None:
        raise ValueError('give prompt (a string, "" for none) or prompt_embeds')
    guided = guidance_scale > 1
    encoded = pipe.encode_prompt(
        prompt,
        device,
        1,
        guided,
        negative_prompt=negative_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
    )
    if len(encoded) != 2:
        raise TypeError(
            f"{type(pipe).__name__}.encode_prompt returns {len(encoded)} values; bdia.diffusers.invert/sample take "
            "pipelines whose encode_prompt returns (prompt_embeds, negative_prompt_embeds), as Stable Diffusion 1/2's"
        )
    cond, uncond = (_fit_batch(e, batch, name) for e, name in zip(encoded, ("prompt", "negative_prompt"), strict=True))
    scheduler = pipe.scheduler
    if gamma is None:
        gamma = scheduler.config.gamma if isinstance(scheduler, _BDIASchedulerBase) else 1.0
    if guided:
        model = model_from(pipe.unet, scheduler, guidance_scale=guidance_scale, encoder_hidden_states=uncond)
    else:
        model = model_from(pipe.unet, scheduler)
    ts = timesteps_from(scheduler, num_inference_steps)
    return model, ts, BDIA(DDIM(), gamma), {"encoder_hidden_states": cond}


def _fit_batch(e: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
    if e is None or e.shape[0] == batch:
        return e
    if e.shape[0] == 1:
        return e.expand(batch, *e.shape[1:])
    raise ValueError(f"{name} gives {e.shape[0]} embeddings for a batch of {batch} latents: give 1 or {batch}")


def _start(n_grid: int, num_inference_steps: int, strength: float) -> int:
    """The grid index a partial walk starts at, as Stable Diffusion's img2img counts it."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    k = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
    if k >= n_grid - 1:
        raise ValueError(f"strength={strength} leaves no step of {num_inference_steps}: use a larger strength")
    return k


def _on_grid(pair: State, ts: torch.Tensor, num_inference_steps: int, name: str) -> int:
    """The grid index of the pair's noisier point; the pair must be two consecutive points of the grid."""
    times = ts.tolist()
    hi, lo = max(pair.t, pair.t_prev), min(pair.t, pair.t_prev)
    k = times.index(hi) if hi in times else -1
    if k < 0 or k + 1 == len(times) or times[k + 1] != lo:
        raise ValueError(
            f"{name} holds times ({pair.t_prev}, {pair.t}), not two consecutive points of the grid of "
            f"num_inference_steps={num_inference_steps} ({times[0]}, {times[1]}, ..., {times[-1]}): use the "
            "num_inference_steps and scheduler configuration of the walk that made it"
        )
    return k


def _device(pipe: Any) -> torch.device:
    """The pipeline's execution device, once it is known to be a Stable Diffusion-family pipeline."""
    if not all(hasattr(pipe, a) for a in ("encode_prompt", "unet", "vae", "scheduler", "image_processor")):
        raise TypeError(
            "pipe must be a Stable Diffusion-family pipeline (unet, vae, text encoder and encode_prompt), got "
            f"{type(pipe).__name__}"
        )
    return getattr(pipe, "_execution_device", None) or pipe.device


def _latents_of(pipe: Any, image_or_latents: Any, device: torch.device) -> torch.Tensor:
    """Latents as given, or the VAE's (posterior mean, scaled as the pipeline scales them) of an image."""
    vae = pipe.vae.config
    if isinstance(image_or_latents, torch.Tensor) and image_or_latents.dim() == 4:
        c = image_or_latents.shape[1]
        if c == vae.latent_channels != vae.in_channels:
            return image_or_latents.to(device)
        if c != vae.in_channels:
            raise ValueError(
                f"a tensor must be latents ({vae.latent_channels} channels) or images ({vae.in_channels} channels), "
                f"got shape {tuple(image_or_latents.shape)}"
            )
    image = pipe.image_processor.preprocess(image_or_latents).to(device=device, dtype=pipe.vae.dtype)
    z = pipe.vae.encode(image).latent_dist.mode()
    shift = getattr(vae, "shift_factor", None) or 0.0
    return (z - shift) * vae.scaling_factor


def invert(
    pipe: Any,
    image_or_latents: Any,
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    strength: float = 1.0,
    gamma: float | None = None,
    progress: bool = False,
    callback: Callable[[Step], bool | None] | None = None,
) -> State:
    """Invert an image (PIL image(s), arrays or a tensor in the pipeline's image format), latents, or a pair
    (``bdia.State``, e.g. ``pipe.scheduler.state`` after sampling with ``BDIAScheduler``) to the noise of the
    pipeline scheduler's grid, with BDIA-DDIM under the prompt's classifier-free guidance.

    Returns the pair (``bdia.State``) that ``sample`` continues from. Images go through the VAE (posterior mean);
    a lone latent's first step is one plain DDIM step (the only approximation), a pair is inverted exactly.
    ``strength`` < 1 inverts only the last ``int(strength * num_inference_steps)`` steps, as img2img counts them.
    ``gamma``: the scheduler's if it is a BDIA one, else 1 (the exactly invertible choice). ``progress`` and
    ``callback(step)`` (after every step; see ``bdia.sampling.Step``) are ``bdia.invert``'s.
    """
    device = _device(pipe)
    with torch.no_grad():
        if isinstance(image_or_latents, State):
            x: torch.Tensor | State = image_or_latents
            batch = image_or_latents.x.shape[0]
        else:
            x = _latents_of(pipe, image_or_latents, device)
            batch = x.shape[0]
        model, ts, solver, cond = _walk_setup(
            pipe,
            batch,
            device,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            num_inference_steps,
            gamma,
        )
        k = _start(len(ts), num_inference_steps, strength)
        if isinstance(x, State):
            _on_grid(x, ts, num_inference_steps, "image_or_latents")
        return bdia.invert(model, x, ts[k:], solver, progress=progress, callback=callback, **cond)


def sample(
    pipe: Any,
    latents: torch.Tensor | State,
    prompt: str | list[str] | None = None,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    strength: float | None = None,
    gamma: float | None = None,
    output_type: str = "pil",
    progress: bool = False,
    callback: Callable[[Step], bool | None] | None = None,
) -> Any:
    """Sample with BDIA-DDIM through the pipeline's components and decode: from a pair that ``invert`` returned
    (editing: pass another prompt; the same prompt rebuilds the inverted latent), or from noise at the grid's start.

    A pair continues from where it lies on the grid (a partial inversion's pair continues its partial walk;
    ``strength``, if given, must agree). A lone tensor is a latent at the grid's start (``strength``: part way).
    ``output_type``: ``"pil"``, ``"np"``, ``"pt"`` (the pipeline's image formats) or ``"latent"``. ``progress`` and
    ``callback(step)`` are ``bdia.sample``'s.
    """
    device = _device(pipe)
    with torch.no_grad():
        if isinstance(latents, State):
            x: torch.Tensor | State = latents
            batch = latents.x.shape[0]
        elif isinstance(latents, torch.Tensor):
            x, batch = latents.to(device), latents.shape[0]
        else:
            raise TypeError(f"latents must be a bdia.State (from invert) or a tensor, got {type(latents).__name__}")
        model, ts, solver, cond = _walk_setup(
            pipe,
            batch,
            device,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            guidance_scale,
            num_inference_steps,
            gamma,
        )
        k = None if strength is None else _start(len(ts), num_inference_steps, strength)
        if isinstance(x, State):
            at = _on_grid(x, ts, num_inference_steps, "latents")
            if k is not None and k != at:
                raise ValueError(
                    f"strength={strength} starts at t = {ts[k]}, but the pair starts at t = {ts[at]}: leave "
                    "strength out to continue the pair where it is"
                )
            k = at
        out = bdia.sample(model, x, ts[k or 0 :], solver, progress=progress, callback=callback, **cond).x
        if output_type == "latent":
            return out
        vae = pipe.vae.config
        shift = getattr(vae, "shift_factor", None) or 0.0
        image = pipe.vae.decode(out / vae.scaling_factor + shift, return_dict=False)[0]
        nsfw = None
        if hasattr(pipe, "run_safety_checker"):
            image, nsfw = pipe.run_safety_checker(image, device, image.dtype)
        keep = [True] * image.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
        return pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=keep)


# --------------------------------------------------------------------------------------- a tiny pipeline


# Stable Diffusion 1.5's scheduler configuration (its published scheduler_config.json)
_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``StableDiffusionPipeline`` with tiny random weights, built offline from configs: a cross-attention
    ``UNet2DConditionModel``, an ``AutoencoderKL``, a one-layer ``CLIPTextModel`` with a letters-only tokenizer
    (8 tokens), and Stable Diffusion 1.5's scheduler configuration. 16x16 images, 4x8x8 latents, milliseconds per
    step on a CPU: for tests, examples and benchmarks of code that drives a pipeline (its images are noise)."""
    import json
    import string
    import tempfile
    from pathlib import Path

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            attention_head_dim=4,
            cross_attention_dim=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        )
        vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
        for suffix in ("", "</w>"):
            vocab.update({c + suffix: len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=16,
                intermediate_size=32,
                num_attention_heads=2,
                num_hidden_layers=1,
                max_position_embeddings=8,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        )
        for module in (unet, vae, text):
            # torch's own conversion of floating-point tensors (diffusers' .to(dtype) warns about fp32 modules)
            torch.nn.Module.to(module, dtype)
    with tempfile.TemporaryDirectory() as folder:  # a vocabulary file and no merges: the classic way to load one
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=8)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(_SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
