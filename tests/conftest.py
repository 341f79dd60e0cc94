"""Shared test helpers: schedules and grids of every kind, and the Gaussian mixture seen through a network."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import settings

from bdia.models import GaussianMixture, Model
from bdia.report import relative_error
from bdia.schedules import EDM, VP, DiscreteVP, Flow, Schedule

# CI runs the same examples every time (a red build must mean a change broke something, not a new draw);
# local runs keep exploring fresh examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tests use small tensors: on a small shared CPU torch's thread pool costs far more than the arithmetic
    (a (256, 8) softmax measured 12.5 ms with the default pool under load, 68 us with one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SCHEDULES = {
    "sd": lambda: DiscreteVP.stable_diffusion(),
    "cosine": lambda: DiscreteVP.from_betas("squaredcos_cap_v2"),
    "linear": lambda: DiscreteVP.from_betas("linear", beta_start=1e-4, beta_end=0.02),
    "zsnr": lambda: DiscreteVP.from_betas("scaled_linear", rescale_zero_terminal_snr=True),
    "vp": lambda: VP(),
    "edm": lambda: EDM(),
    "flow": lambda: Flow(),
}
_CACHE: dict[str, Schedule] = {}


def schedule(kind: str) -> Schedule:
    if kind not in _CACHE:
        _CACHE[kind] = SCHEDULES[kind]()
    return _CACHE[kind]


def grid(kind: str, n: int, variant: int = 0) -> torch.Tensor:
    """A grid of ``n`` steps of a kind each schedule's users actually run (``variant`` picks among them)."""
    s = schedule(kind)
    if isinstance(s, DiscreteVP):
        options = [
            dict(spacing="leading", steps_offset=1),
            dict(spacing="trailing"),
            dict(spacing="linspace", set_alpha_to_one=True),
            dict(spacing="trailing", set_alpha_to_one=True),
            dict(spacing="leading", steps_offset=0),
        ]
        if kind == "zsnr":  # zero terminal SNR is used with trailing spacing (Lin et al.)
            options = [dict(spacing="trailing"), dict(spacing="trailing", set_alpha_to_one=True)]
        return s.timesteps(n, **options[variant % len(options)])
    if isinstance(s, VP):
        return s.timesteps(n, eps=[1e-3, 1e-2][variant % 2])
    if isinstance(s, EDM):
        return s.timesteps(max(n, 2), rho=[7.0, 3.0][variant % 2], final_zero=variant % 3 != 2)
    return s.timesteps(n, shift=[1.0, 3.0][variant % 2])


def prior_noise(s: Schedule, t: float, shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A draw from the noisy marginal's scale at ``t``: N(0, alpha^2 + sigma^2) (data has unit scale)."""
    k = s.at(t)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (z * math.sqrt(k.alpha**2 + k.sigma**2)).to(dtype)


def gmm_net(gmm: GaussianMixture, prediction: str):
    """The mixture's exact prediction expressed as a network output of the given parametrisation."""

    def net(x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
        tt = float(t[0])
        p, k = gmm(x, tt, **kw), gmm.schedule.at(tt)
        outputs = {
            "epsilon": lambda: p.eps,
            "sample": lambda: p.x0,
            "v": lambda: k.alpha * p.eps - k.sigma * p.x0,
            "velocity": lambda: k.dalpha * p.x0 + k.dsigma * p.eps,
        }
        return outputs[prediction]()

    return net


def model_for(kind: str, prediction: str | None, dim: int = 8, seed: int = 1):
    """The mixture itself (``prediction=None``) or a ``Model`` wrapping it as a network."""
    gmm = GaussianMixture.random(schedule(kind), dim=dim, components=3, std=0.5, seed=seed)
    if prediction is None:
        return gmm
    return Model(gmm_net(gmm, prediction), gmm.schedule, prediction, time_dtype=torch.float64)


rel_err = relative_error
