"""Shared test helpers, from ``bdia.testing``: schedules and grids of every kind, the Gaussian mixture seen through a
network of each parametrisation, and the hypothesis profile CI runs."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import settings

from bdia.models import GaussianMixture, Model
from bdia.report import relative_error
from bdia.schedules import Schedule
from bdia.testing import MixtureNet
from bdia.testing import strategies as bst

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


SCHEDULES = bst.SCHEDULES  # kind -> factory: sd, cosine, linear, zsnr, vp, edm, flow


def schedule(kind: str) -> Schedule:
    """The schedule of a kind, built once."""
    return bst.schedule(kind)


def grid(kind: str, n: int, variant: int = 0) -> torch.Tensor:
    """A grid of ``n`` steps of a kind each schedule's users actually run (``variant`` picks among them)."""
    return bst.grid(schedule(kind), n, variant)


def prior_noise(s: Schedule, t: float, shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """A draw from the noisy marginal's scale at ``t``: N(0, alpha^2 + sigma^2) (data has unit scale)."""
    k = s.at(t)
    z = torch.randn(shape, generator=generator, dtype=torch.float64)
    return (z * math.hypot(k.alpha, k.sigma)).to(dtype)


def gmm_net(gmm: GaussianMixture, prediction: str) -> MixtureNet:
    """The mixture's exact prediction expressed as a network output of the given parametrisation."""
    return MixtureNet(gmm, prediction)


def model_for(kind: str, prediction: str | None, dim: int = 8, seed: int = 1):
    """The mixture itself (``prediction=None``) or a ``Model`` wrapping it as a network."""
    gmm = GaussianMixture.random(schedule(kind), dim=dim, components=3, std=0.5, seed=seed)
    if prediction is None:
        return gmm
    return Model(gmm_net(gmm, prediction), gmm.schedule, prediction, time_dtype=torch.float64)


rel_err = relative_error
