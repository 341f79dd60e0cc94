"""Small seeded random networks for testing solvers on something less forgiving than the analytic mixture.

A trained diffusion network is not available in a test, and the analytic Gaussian mixture is too kind: its
probability-flow map barely amplifies a perturbation, while a real (or random) network's Jacobian can grow one by
orders of magnitude over a walk. ``RandomNet`` is a three-layer convolutional network with a time embedding and
EDM-style input scaling, built from a seed with PyTorch's default initialisation and put in ``eval()`` mode; it
runs in whatever dtype it is cast to (``.double()``) and never downloads anything.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bdia.models import GaussianMixture, Model
from bdia.schedules import Schedule

__all__ = ["MixtureNet", "RandomNet", "random_model"]


class RandomNet(nn.Module):
    """``net(x, t) -> Tensor`` shaped like ``x = (batch, channels, height, width)``: three 3x3 convolutions with SiLU,
    a sinusoidal embedding of ``t`` added after the first, and the input scaled by ``1 / sqrt(alpha^2 + sigma^2)``
    of ``schedule`` at ``t`` (so that its first layer sees unit-scale inputs on every schedule, as EDM's ``c_in``
    does for data of unit scale). Its output has the scale of what ``prediction`` names for unit-scale data and
    noise: 1 for ``"epsilon"`` and ``"sample"``, ``sqrt(alpha^2 + sigma^2)`` for ``"v"``, ``sqrt(alpha'^2 + sigma'^2)``
    for ``"velocity"`` (a velocity in a discrete schedule's index time is of order 1e-3, not 1). ``gain`` scales the
    weights of the hidden layers (1: PyTorch's default initialisation; larger gains make a network whose Jacobian
    amplifies more). Built in ``eval()`` mode, in float32; ``.to(dtype)`` casts it.
    """

    def __init__(
        self,
        schedule: Schedule,
        channels: int = 2,
        hidden: int = 16,
        *,
        prediction: str = "epsilon",
        seed: int = 0,
        gain: float = 1.0,
    ):
        super().__init__()
        if prediction not in _OUTPUT_SCALE:
            raise ValueError(f"unknown prediction={prediction!r}; expected one of {sorted(_OUTPUT_SCALE)}")
        self.prediction = prediction
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a bdia.schedules.Schedule, got {type(schedule).__name__}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 2 or hidden % 2:
            raise ValueError(f"hidden must be an even int >= 2, got {hidden!r}")
        self.schedule, self.t_scale = schedule, max(abs(schedule.t_min), abs(schedule.t_max))
        fork = torch.random.fork_rng(devices=[])  # the weights come from the seed, not from the global stream
        with fork:
            torch.manual_seed(seed)
            self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
            self.mid = nn.Conv2d(hidden, hidden, 3, padding=1)
            self.out = nn.Conv2d(hidden, channels, 3, padding=1)
            self.time = nn.Linear(hidden, hidden)
            self.freqs = nn.Parameter(torch.randn(hidden // 2) * 4.0, requires_grad=False)
        with torch.no_grad():
            for layer in (self.mid, self.out):
                layer.weight.mul_(gain)
        self.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RandomNet takes (batch, channels, height, width) latents, got shape {tuple(x.shape)}")
        # one time per call (bdia.models.Model passes the same t for the whole batch)
        k = self.schedule.at(float(t[0]))
        c_in = 1.0 / math.hypot(k.alpha, k.sigma)
        phase = (t.to(x.dtype) / self.t_scale)[:, None] * self.freqs.to(x.dtype)
        emb = self.time(torch.cat([phase.sin(), phase.cos()], dim=1))
        h = nn.functional.silu(self.inp(x * c_in) + emb[:, :, None, None])
        h = nn.functional.silu(self.mid(h))
        scale = _OUTPUT_SCALE[self.prediction](k)
        return self.out(h) if scale == 1.0 else self.out(h) * scale


_OUTPUT_SCALE = {
    "epsilon": lambda k: 1.0,
    "sample": lambda k: 1.0,
    "v": lambda k: math.hypot(k.alpha, k.sigma),
    "velocity": lambda k: math.hypot(k.dalpha, k.dsigma),
}


def random_model(
    schedule: Schedule,
    prediction: str = "epsilon",
    *,
    channels: int = 2,
    hidden: int = 16,
    seed: int = 0,
    gain: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Model:
    """A ``bdia.models.Model`` over a ``RandomNet`` of ``dtype`` (float32 by default, as a user's network is),
    with the time passed as float64 (so that a network in any dtype sees the grid's times exactly)."""
    net = RandomNet(schedule, channels, hidden, prediction=prediction, seed=seed, gain=gain).to(dtype)
    return Model(net, schedule, prediction, time_dtype=torch.float64)


class MixtureNet:
    """The analytic mixture's exact prediction as the output of a network of a parametrisation (``"epsilon"``,
    ``"sample"``, ``"v"`` or ``"velocity"``), for ``Model(MixtureNet(gmm, p), gmm.schedule, p)``: what ``Model`` must
    turn back into the mixture's own ``(x0, eps)``."""

    def __init__(self, gmm: GaussianMixture, prediction: str):
        if prediction not in _OUTPUT_SCALE:
            raise ValueError(f"unknown prediction={prediction!r}; expected one of {sorted(_OUTPUT_SCALE)}")
        self.gmm, self.prediction = gmm, prediction

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kw: object) -> torch.Tensor:
        tt = float(t[0])
        p, k = self.gmm(x, tt, **kw), self.gmm.schedule.at(tt)
        if self.prediction == "epsilon":
            return p.eps
        if self.prediction == "sample":
            return p.x0
        if self.prediction == "v":
            return k.alpha * p.eps - k.sigma * p.x0
        return k.dalpha * p.x0 + k.dsigma * p.eps

    def __repr__(self) -> str:
        return f"MixtureNet({self.prediction!r})"
