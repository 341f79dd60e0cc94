"""BDIA (Zhang, Lewis & Kleijn, ECCV 2024) as diffusers schedulers: one walk, two scheduler families.

``_BDIASchedulerBase`` is the walk a pipeline's loop drives: the pair state, ``step`` (``bdia.solvers.BDIA.step``,
or ``unstep`` for an inverse scheduler) on the network's output, the checks that each step continues the walk,
and where a given pair sits on the grid (``bdia.sampling.locate``). A family only says what its configuration
means:

- ``BDIAScheduler`` / ``BDIAInverseScheduler``: ``DDIMScheduler``'s configuration plus ``gamma``, BDIA over DDIM on
  a discrete VP schedule, sampling and inversion;
- ``BDIAFlowMatchScheduler``: ``FlowMatchEulerDiscreteScheduler``'s configuration plus ``gamma``, BDIA over Euler
  on rectified flow (SD3, SD3.5, Flux), on that scheduler's own grid.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import ConfigMixin, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from bdia import State
from bdia.diffusers.adapters import _PREDICTIONS, _flow_keys, _Net, discrete_timestep, flow_grid, model_over
from bdia.models import Prediction
from bdia.sampling import locate, stamp
from bdia.schedules import DiscreteVP, Flow, Schedule
from bdia.solvers import BDIA, DDIM, Euler, Integrator

__all__ = ["BDIAFlowMatchScheduler", "BDIAInverseScheduler", "BDIAScheduler", "BDIASchedulerOutput"]

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
# Flow-matching schedulers whose configuration means what FlowMatchEulerDiscreteScheduler's means
_FLOW_LIKE = ["FlowMatchEulerDiscreteScheduler", "BDIAFlowMatchScheduler"]


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
    """The walk a pipeline drives, whatever the family: a grid, the pair state, and ``step``.

    A family sets ``schedule`` and ``integrator`` and, in its ``set_timesteps``, calls ``_begin`` with the grid
    (float64 times, noisiest first, end point included), the timestep value a pipeline passes at each grid point,
    and how many of them a sampling walk evaluates. ``forward`` is the direction of travel: sampling (noisiest
    first, ``BDIA.step``) or inversion (``BDIA.unstep``).
    """

    order = 1
    forward = True
    _returns_x0 = True  # step's output has pred_original_sample (DDIMScheduler's does)
    schedule: Schedule
    integrator: Integrator
    _tick_dtype = torch.int64

    def _init_walk(self) -> None:
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self._grid: list[float] | None = None
        self._state: State | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _begin(
        self,
        grid: list[float],
        ticks: Sequence[float | None],
        steps: int,
        device: str | torch.device | None,
        state: State | None,
    ) -> None:
        """Start a walk over ``grid``; ``ticks[i]``: the pipeline's timestep value at ``grid[i]`` (None: never
        passed); ``steps``: the timesteps a fresh sampling walk evaluates; ``state``: a pair to continue from."""
        self._grid, self._ticks = grid, list(ticks)
        self._where = {tick: i for i, tick in enumerate(self._ticks) if tick is not None}
        self._model = model_over(_Net(_given_output, discrete_timestep), self)
        self._solver = BDIA(self.integrator, self.config.gamma)
        self._state, self._given, self._step_index, self._begin_index = None, None, None, None
        self._history, self._origin = None, None  # a given pair's recorded grid; the grid index the walk began at
        start = 0 if self.forward else len(grid) - 1
        if state is not None:
            walk = grid if self.forward else grid[::-1]
            try:
                oriented, k = locate(_pair(state, "state"), walk, self._solver, name="state")
            except ValueError as e:
                raise ValueError(
                    f"{e}; set_timesteps({self.num_inference_steps}) made this grid: pass the num_inference_steps "
                    "and config of the walk that made it"
                ) from None
            start = k if self.forward else len(grid) - 1 - k
            # the first step must be given the pair's point at the front of this walk
            self._state, self._given = oriented, (oriented.x if self.forward else oriented.x_prev)
            self._history, self._origin = state.grid, start
        visible = list(range(start, steps)) if self.forward else list(range(start, 0, -1))
        self._visible, self._position = visible, {i: p for p, i in enumerate(visible)}
        self.timesteps = torch.tensor([self._ticks[i] for i in visible], dtype=self._tick_dtype, device=device)

    # ------------------------------------------------------------------------------------ what pipelines call

    @property
    def state(self) -> State | None:
        """The pair of latents the walk holds, as ``bdia.sample`` / ``bdia.invert`` return it (``x`` the latent the
        walk is at, ``x_prev`` the one before it), or None before the first step. After a pipeline run this is what
        ``invert`` needs for an exact inversion."""
        st = self._state
        if st is None:
            return None
        if not self.forward:
            st = st.flipped()  # kept in sampling orientation, shown facing the inversion walk
        # its provenance, as bdia.sample / bdia.invert stamp theirs: the grid times this walk passed through (and
        # those of a pair it continued), and the solver, so that a walk on another grid or scheme refuses it
        front = self._grid.index(st.t)
        walked = self._grid[min(self._origin, front) : max(self._origin, front) + 1]
        return stamp(st if self._history is None else st.replace(grid=self._history), walked, self._solver)

    @property
    def step_index(self) -> int | None:
        """The index in ``timesteps`` of the next step (None before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index in ``timesteps`` a pipeline said its walk begins at (``set_begin_index``)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """As diffusers' schedulers: img2img pipelines say where in ``timesteps`` their walk begins. The walk
        itself is located by the timestep each ``step`` is given (``scale_noise`` reads this index)."""
        self._begin_index = begin_index

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The index of ``timestep`` in ``schedule_timesteps`` (default: ``timesteps``), as diffusers counts it."""
        if schedule_timesteps is None:
            schedule_timesteps = self.timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep):g} is not one of the scheduler's timesteps")
        return int(indices[1 if len(indices) > 1 else 0].item())

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------------------------------- the walk

    def _index(self, timestep: Any) -> int:
        """The grid index of a timestep a pipeline passes."""
        if self._grid is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step")
        at = self._element_of_timesteps(timestep)
        if at is not None:
            return self._visible[at]
        tick = float(timestep)  # (a host sync for a tensor on an accelerator)
        i = self._where.get(tick)
        if i is None:
            shown = [t for t in self._ticks if t is not None]
            raise ValueError(
                f"timestep {tick:g} is not on the grid set_timesteps({self.num_inference_steps}) made "
                f"({', '.join(f'{v:g}' for v in shown[:3])}, ..., {shown[-1]:g})"
            )
        return i

    def _element_of_timesteps(self, timestep: Any) -> int | None:
        """The position in ``timesteps`` of a timestep that is one of its elements (a pipeline loops ``for t in
        scheduler.timesteps``: each ``t`` is a view into that tensor), read from where it lies in memory, so that a
        step on an accelerator never waits to read the value back; None for any other timestep."""
        ts = self.timesteps
        if not isinstance(timestep, torch.Tensor) or timestep.dim() != 0 or timestep.device != ts.device:
            return None
        if timestep.dtype != ts.dtype or timestep.untyped_storage().data_ptr() != ts.untyped_storage().data_ptr():
            return None
        at = timestep.storage_offset() - ts.storage_offset()
        return at if 0 <= at < ts.numel() and ts.stride(0) == 1 else None

    def _advance(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor
    ) -> tuple[torch.Tensor, Prediction]:
        """One step of the walk from ``timestep``, given the network's output at ``sample``: the latent it makes
        and the prediction at ``sample``."""
        i = self._index(timestep)
        t = self._grid[i]
        if not isinstance(model_output, torch.Tensor) or not isinstance(sample, torch.Tensor):
            raise TypeError("model_output and sample must be tensors")
        pred = self._model(sample, t, output=model_output)
        st = self._state
        if st is not None and (st.t if self.forward else st.t_prev) != t:
            front = st.t if self.forward else st.t_prev
            raise ValueError(
                f"timestep {float(timestep):g} does not continue the walk, which is at t = {front:g}: call "
                "set_timesteps to start a new walk"
            )
        j = i + 1 if self.forward else i - 1
        if j < 0:
            raise ValueError(
                f"timestep {float(timestep):g} is the noisiest point of the grid: the inversion walk is complete"
            )
        if j == len(self._grid):  # the last timestep is the end point: nothing left to walk (DDIMScheduler's identity)
            self._step_index = self._position.get(i, -1) + 1
            return sample, pred
        model = _Answer(self.schedule, pred)
        if st is None:
            st = self._solver.init(model, sample, t, self._grid[j])  # a lone latent: one plain integrator step
            self._origin = i
            if not self.forward:
                st = st.flipped()  # (held in sampling orientation)
        else:
            self._check_given(sample)
            if self.forward:
                st = self._solver.step(model, State(st.x_prev, sample, st.t_prev, st.t), self._grid[j])
            else:
                st = self._solver.unstep(model, State(sample, st.x, st.t_prev, st.t), self._grid[j])
        self._state = st
        self._step_index = self._position.get(i, -1) + 1
        return (st.x if self.forward else st.x_prev), pred

    def _check_given(self, sample: torch.Tensor) -> None:
        """The first step from a given pair must be given that pair's latent (not the other one)."""
        if self._given is not None:
            expected, self._given = self._given, None
            if sample is not expected and not torch.equal(sample, expected):
                raise ValueError(
                    "sample differs from the pair's latent at this timestep: after set_timesteps(..., state=pair) "
                    "the first step takes the pair's point at timesteps[0]"
                )

    def _output(self, prev: torch.Tensor, pred: Prediction, return_dict: bool) -> Any:
        """What ``step`` returns: the family's diffusers counterpart's output (x0 only where it returns one: it
        costs a pass over the latent)."""
        x0 = pred.x0 if self._returns_x0 else None
        if not return_dict:
            return (prev, x0) if self._returns_x0 else (prev,)
        return BDIASchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# --------------------------------------------------------------------------------- DDIM-like discrete family


@functools.cache
def _ddim_like_keys() -> frozenset[str]:
    """Every configuration key of the DDIM-like schedulers (of the installed diffusers) and of ours."""
    keys = set(inspect.signature(_DiscreteBDIAScheduler.__init__).parameters)
    for name in _DDIM_LIKE:
        cls = getattr(diffusers, name, None)
        if cls is not None:
            keys |= set(inspect.signature(cls.__init__).parameters)
    return frozenset(keys - {"self", "kwargs"})


def _refuse_foreign(cls: type, config: Any, family: list[str], keys: frozenset[str], what: str) -> dict:
    """A config for ``cls.from_config``: one named by a saved ``_class_name`` outside ``family``, or made in memory
    with keys no scheduler of the family has, is refused (its keys mean something else)."""
    given = dict(config or {})
    name = given.get("_class_name")
    # a config made in memory has no class name: then its keys tell (a saved config may carry keys of older
    # diffusers versions, which diffusers ignores)
    foreign = [] if name is not None else sorted(k for k in given if not k.startswith("_") and k not in keys)
    if (name is not None and name not in family) or foreign:
        got = f"{name}'s" if name is not None and name not in family else f"one with the keys {foreign}"
        raise ValueError(
            f"{cls.__name__}.from_config needs the config of {what} ({', '.join(family[:6])}, ...); got {got}, "
            "which no such scheduler has"
        )
    return given


class _DiscreteBDIAScheduler(_BDIASchedulerBase):
    """The DDIM-like family: ``DDIMScheduler``'s configuration (a discrete VP table and a timestep spacing) plus
    ``gamma``; BDIA over DDIM."""

    _compatibles = _DDIM_LIKE

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
        self.integrator = DDIM()
        self._init_walk()
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._check()  # what the pipeline may rewrite later is checked again in set_timesteps

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
        given = _refuse_foreign(
            cls, config, _DDIM_LIKE, _ddim_like_keys(), "a DDIM-like scheduler, betas over discrete timesteps"
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
        self.num_inference_steps = num_inference_steps
        self._begin(grid, grid, num_inference_steps, device, state)

    @staticmethod
    def _check_eta(eta: float) -> None:
        if eta != 0:
            raise ValueError(
                f"eta must be 0, got {eta}: BDIA is a deterministic (probability-flow ODE) sampler; eta > 0 adds "
                "fresh noise at every step, which no inversion can recover"
            )

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step from ``timestep`` to the grid's next point in the walk's direction, given the network's output
        at ``sample``; ``generator`` is unused (nothing is random), ``eta`` must be 0."""
        self._check_eta(eta)
        return self._output(*self._advance(model_output, timestep, sample), return_dict)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha(t) x0 + sigma(t) noise`` per sample (the forward process at training timesteps)."""
        ts = torch.as_tensor(timesteps).flatten().tolist()
        k = [self.schedule.at(float(t)) for t in ts]
        shape = (-1, *([1] * (original_samples.dim() - 1)))
        on = {"dtype": torch.float64, "device": original_samples.device}
        alpha = torch.tensor([c.alpha for c in k], **on).reshape(shape).to(original_samples.dtype)
        sigma = torch.tensor([c.sigma for c in k], **on).reshape(shape).to(original_samples.dtype)
        return alpha * original_samples + sigma * noise


class BDIAScheduler(_DiscreteBDIAScheduler):
    """BDIA-DDIM as a diffusers scheduler: ``DDIMScheduler``'s configuration plus ``gamma`` (in [0, 1]).

    ``step`` is ``bdia.solvers.BDIA(DDIM(), gamma)``: the first step of a walk is a plain DDIM step, every later one
    ``x_next = DDIM(x; t -> t_next) + gamma (x_prev - DDIM(x; t -> t_prev))``, with the pair ``(x_prev, x)`` kept
    in the scheduler (``state``) and reset by ``set_timesteps``. gamma = 0 is DDIM; gamma = 1 is exactly
    invertible with ``BDIAInverseScheduler`` or ``bdia.diffusers.invert``. Every step goes to the grid's next
    timestep (for ``linspace`` spacing this is not DDIMScheduler's ``t - T // n``; see docs/diffusers.md).
    ``clip_sample`` and ``thresholding`` act on x0 as in DDIMScheduler; they keep the step invertible.
    """


class BDIAInverseScheduler(_DiscreteBDIAScheduler):
    """The inverse of ``BDIAScheduler``: the same configuration and grid, walked from the end point to the noisiest
    timestep with ``BDIA.unstep``.

    ``timesteps`` are the times at which the network is evaluated, rising (the current, noisier point of the
    inversion walk). From a lone latent at the end point (a real image's latent) the first step is one plain DDIM
    step, the only approximation; from a pair (``set_timesteps(n, state=sampler.state)``) every step is exact to
    rounding when gamma > 0 (rounding grows like gamma^-N for gamma < 1: use gamma = 1).
    """

    forward = False

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None, state: State | None = None
    ) -> None:
        if self.config.gamma == 0:
            raise ValueError("gamma = 0 is plain DDIM, which BDIA cannot invert: configure gamma > 0 (1 is exact)")
        super().set_timesteps(num_inference_steps, device, state)


# ------------------------------------------------------------------------------------------ flow matching


class BDIAFlowMatchScheduler(_BDIASchedulerBase):
    """BDIA over Euler on rectified flow as a diffusers scheduler: a drop-in for ``FlowMatchEulerDiscreteScheduler``
    (SD3, SD3.5, Flux), configured by its configuration plus ``gamma`` (in [0, 1]).

    The grid is ``FlowMatchEulerDiscreteScheduler``'s own: its ``set_timesteps(num_inference_steps, device,
    sigmas=, mu=, timesteps=)`` computes the sigmas (static ``shift``, dynamic shifting with ``mu``,
    ``shift_terminal``, Karras / exponential / beta sigmas), which are walked as float64 values of those float32
    numbers, terminal 0 included; ``timesteps`` are its timesteps, float32, to the bit. ``step`` is
    ``bdia.solvers.BDIA(Euler(), gamma)`` on the velocity the network predicts (``x0 = x - sigma v``,
    ``eps = x + (1 - sigma) v``): the first step of a walk is FlowMatchEulerDiscreteScheduler's Euler step
    ``x + (sigma_next - sigma) v``, every later one adds ``gamma (x_prev - Euler(x; sigma -> sigma_prev))``.
    gamma = 0 is FlowMatchEulerDiscreteScheduler's walk (to rounding); gamma = 1 is exactly invertible by
    ``bdia.diffusers.invert``. The pair is kept in ``state``; ``scale_noise`` is the flow's forward process
    (SD3 img2img). Refused: ``stochastic_sampling``, ``invert_sigmas`` and per-token timesteps.
    """

    _compatibles = _FLOW_LIKE
    _tick_dtype = torch.float32
    _returns_x0 = False  # (as FlowMatchEulerDiscreteScheduler: prev_sample only)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        gamma: float = 1.0,
    ):
        self._check()
        # diffusers' own scheduler, on the same configuration, computes every grid (and checks its own keys)
        reference = FlowMatchEulerDiscreteScheduler.from_config(self._reference_config())
        self.timesteps, self.sigmas = reference.timesteps, reference.sigmas
        self.sigma_min, self.sigma_max = reference.sigma_min, reference.sigma_max
        self._shift = shift
        self.schedule = Flow()
        self.integrator = Euler()
        self._init_walk()

    def _reference_config(self) -> dict:
        return {k: v for k, v in self.config.items() if k in _flow_keys()}

    def _check(self) -> None:
        c = self.config
        BDIA(Euler(), c.gamma)  # gamma's own checks: a float in [0, 1]
        if c.stochastic_sampling:
            raise ValueError(
                "stochastic_sampling=True draws fresh noise at every step (x0 re-noised to the next sigma), which no "
                "inversion can recover: BDIA is a deterministic (probability-flow ODE) sampler; use "
                "stochastic_sampling=False"
            )
        if c.invert_sigmas:
            raise ValueError(
                "invert_sigmas=True walks sigma from 0 to 1 (the reverse of a sampling walk); BDIAFlowMatchScheduler "
                "samples from sigma = 1 to 0: use invert_sigmas=False (and bdia.diffusers.invert to invert)"
            )

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any) -> Any:
        """As diffusers' ``from_config``, for the config of a flow-matching scheduler
        (``FlowMatchEulerDiscreteScheduler``'s keys); ``kwargs`` override it (``gamma=...``)."""
        _refuse_foreign(
            cls,
            config,
            _FLOW_LIKE,
            _flow_keys() | {"gamma"},
            "a flow-matching scheduler, FlowMatchEulerDiscreteScheduler's keys",
        )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def shift(self) -> float:
        """The static shift (``set_shift`` changes it, as in FlowMatchEulerDiscreteScheduler)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        self._shift = shift

    def _walked(self, num_inference_steps, sigmas, mu, timesteps, device) -> tuple[torch.Tensor, ...]:
        self._check()
        return flow_grid(
            self._reference_config(),
            num_inference_steps,
            sigmas=sigmas,
            mu=mu,
            timesteps=timesteps,
            device=device,
            shift=self._shift,
        )

    def grid(
        self,
        num_inference_steps: int | None = None,
        *,
        sigmas: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
    ) -> torch.Tensor:
        """The float64 grid (sigmas, terminal 0 included) that ``set_timesteps`` with these arguments walks."""
        return self._walked(num_inference_steps, sigmas, mu, timesteps, None)[0]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Any = None,
        mu: float | None = None,
        timesteps: Any = None,
        state: State | None = None,
    ) -> None:
        """Set FlowMatchEulerDiscreteScheduler's grid for these arguments and start a new walk (the pair state is
        reset). ``state``: a pair on this grid to continue from (``timesteps`` then lists the steps that remain,
        and the first ``step`` takes the pair's latent at ``timesteps[0]``)."""
        grid, sigmas32, timesteps32 = self._walked(num_inference_steps, sigmas, mu, timesteps, device)
        self.sigmas, self.num_inference_steps = sigmas32, len(timesteps32)
        ticks = [*timesteps32.tolist(), None]  # (the terminal sigma = 0 is never a step's start)
        if len(set(ticks)) != len(ticks):
            raise ValueError(f"the timesteps must be distinct to locate each step, got {timesteps32.tolist()}")
        self._begin(grid.tolist(), ticks, len(timesteps32), device, state)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> BDIASchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One BDIA step from ``timestep`` to the grid's next sigma, given the network's velocity at ``sample``.

        ``s_tmin``, ``s_tmax``, ``s_noise`` and ``generator`` are unused, as in FlowMatchEulerDiscreteScheduler
        (nothing is random); ``s_churn`` must be 0 and ``per_token_timesteps`` None. A velocity of another dtype
        than the latent (a bfloat16 transformer over float32 latents, as Wan's pipeline runs it) is cast to the
        latent's: the walk keeps the latent's precision (FlowMatchEulerDiscreteScheduler returns the network's
        dtype instead)."""
        if per_token_timesteps is not None:
            raise ValueError(
                "per_token_timesteps: a step with a time per token moves tokens to different sigmas, so the walk has "
                "no single grid for its pair; BDIAFlowMatchScheduler steps every token on one grid"
            )
        if s_churn != 0:
            raise ValueError(
                f"s_churn must be 0, got {s_churn}: BDIA is a deterministic (probability-flow ODE) sampler"
            )
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "timestep must be one of scheduler.timesteps (a float), not an integer index from enumerate(timesteps)"
            )
        if isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor):
            model_output = model_output.to(sample.dtype)  # (a no-op in the same dtype)
        return self._output(*self._advance(model_output, timestep, sample), return_dict)

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The flow's forward process ``sigma noise + (1 - sigma) sample`` at ``timestep`` (per sample), with the
        sigma FlowMatchEulerDiscreteScheduler reads: that of ``begin_index`` when a pipeline set it, else the
        timestep's own."""
        if self._grid is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before scale_noise")
        timestep = torch.as_tensor(timestep).flatten()
        if self.begin_index is None:
            positions = [self.index_for_timestep(t) for t in timestep.to(self.timesteps.device)]
        else:
            positions = [self.begin_index if self.step_index is None else self.step_index] * timestep.shape[0]
        visible = list(self._position)
        on = {"dtype": torch.float64, "device": sample.device}
        sigma = torch.tensor([self._grid[visible[p]] for p in positions], **on).to(sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.dim() - 1)))
        return sigma * noise + (1.0 - sigma) * sample
