"""Linear combinations of tensors with float64 coefficients: the one arithmetic kernel of every step.

Every update in this library (a DDIM step, a BDIA step and its inverse, a change of parametrisation) is
a linear combination of a few tensors whose coefficients come from float64 time arithmetic.
``lincomb`` merges coefficients of the same tensor (in float64, before touching any tensor: fewer
passes over memory and no cancellation between large tensor terms), skips zeros, and casts each
coefficient to the state's dtype only when it is applied. It never modifies its inputs.
"""

from __future__ import annotations

import torch

__all__ = ["Coef", "Terms", "lincomb", "scaled"]

Coef = float | torch.Tensor  # a python float (float64), or a per-sample tensor broadcastable to the terms
Terms = list[tuple[Coef, torch.Tensor]]


def scaled(c: Coef, terms: Terms) -> Terms:
    """The terms of ``c * sum(terms)`` (coefficients multiply; no tensor is touched)."""
    return [(c * a, T) for a, T in terms]


def lincomb(*terms: tuple[Coef, torch.Tensor]) -> torch.Tensor:
    """``sum_i c_i T_i`` with terms on the same tensor object merged first; always a fresh tensor."""
    merged: dict[int, list] = {}
    for c, T in terms:
        slot = merged.get(id(T))
        if slot is None:
            merged[id(T)] = [c, T]
        else:
            slot[0] = slot[0] + c
    items = [(c, T) for c, T in merged.values() if isinstance(c, torch.Tensor) or c != 0]
    if not items:
        return torch.zeros_like(terms[0][1])
    c, T = items[0]
    out = T * (c.to(T.dtype) if isinstance(c, torch.Tensor) else c)
    for c, T in items[1:]:
        if isinstance(c, torch.Tensor):
            out.addcmul_(T, c.to(out.dtype))
        else:
            out.add_(T, alpha=c)
    return out
