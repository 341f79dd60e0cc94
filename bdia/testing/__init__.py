"""Property tests for users: check your own integrators, solvers and denoisers against bdia's contract.

- ``assert_round_trip`` / ``round_trip``: exact inversion to within a rounding model that measures the walk's own
  growth (``bdia.testing.roundtrip``);
- ``check_integrator``, ``check_solver``, ``check_denoiser``: the contracts, checked, each failure an
  ``AssertionError`` naming what broke;
- ``bdia.testing.strategies``: hypothesis strategies for schedules, grids, gammas, latents, integrators and solvers
  (imports hypothesis, the ``testing`` extra: ``pip install "bdia[testing]"``);
- ``RandomNet`` / ``random_model``: small seeded conv nets, less forgiving than the analytic mixture.

Guide: docs/testing.md.
"""

from __future__ import annotations

from typing import Any

from bdia.testing.accuracy import Order, OrderProblem, measured_order
from bdia.testing.checks import (
    Check,
    ConstantNoise,
    RoundTripCase,
    check_denoiser,
    check_integrator,
    check_solver,
    denoiser_checks,
    integrator_checks,
    solver_checks,
    standard_round_trips,
)
from bdia.testing.networks import MixtureNet, RandomNet, random_model
from bdia.testing.roundtrip import ROUNDINGS, RoundTrip, assert_round_trip, round_trip

__all__ = [
    "ROUNDINGS",
    "Check",
    "ConstantNoise",
    "MixtureNet",
    "Order",
    "OrderProblem",
    "RandomNet",
    "RoundTrip",
    "RoundTripCase",
    "assert_round_trip",
    "check_denoiser",
    "check_integrator",
    "check_solver",
    "denoiser_checks",
    "integrator_checks",
    "measured_order",
    "random_model",
    "round_trip",
    "solver_checks",
    "standard_round_trips",
    "strategies",
]


def __getattr__(name: str) -> Any:
    if name == "strategies":  # imports hypothesis: only when asked for
        import importlib

        try:
            return importlib.import_module("bdia.testing.strategies")
        except ModuleNotFoundError as e:
            if e.name != "hypothesis":
                raise
            raise ModuleNotFoundError(
                "bdia.testing.strategies needs hypothesis: pip install 'bdia[testing]'", name="hypothesis"
            ) from e
    raise AttributeError(f"module 'bdia.testing' has no attribute {name!r}")
