"""The explicit state of a (two-step) solver: a pair of latents and their times."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["State", "check_latent", "check_state"]


class State(NamedTuple):
    """``x`` at time ``t``, and ``x_prev`` at ``t_prev``, the point just before it on the walk that made it.

    ``bdia.sample`` returns the pair ``(x_1, x_0)`` (``x`` the sample); ``bdia.invert`` returns
    ``(x_{N-1}, x_N)`` (``x`` the inverted latent). Each accepts the other's state and continues from
    that pair, so sampling from an inverted state rebuilds the data exactly (for exact solvers).
    """

    x_prev: torch.Tensor
    x: torch.Tensor
    t_prev: float
    t: float

    def flipped(self) -> State:
        """The same pair seen from the other direction of travel."""
        return State(self.x, self.x_prev, self.t, self.t_prev)


def check_latent(x: object, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a bdia.State, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading batch dimension, got a 0-d tensor")
    return x


def check_state(s: State, name: str = "state") -> State:
    """Both latents must share shape, dtype and device; the times must be python floats."""
    if not isinstance(s, State):
        raise TypeError(f"{name} must be a bdia.State, got {type(s).__name__}")
    check_latent(s.x, f"{name}.x")
    check_latent(s.x_prev, f"{name}.x_prev")
    for what in ("shape", "dtype", "device"):
        a, b = getattr(s.x_prev, what), getattr(s.x, what)
        if a != b:
            raise ValueError(f"{name}.x_prev and {name}.x must share {what}: got {a} and {b}")
    for what in ("t_prev", "t"):
        if not isinstance(getattr(s, what), float):
            raise TypeError(f"{name}.{what} must be a python float, got {type(getattr(s, what)).__name__}")
    return s
