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
    coef: dict[int, Coef] = {}
    tensor: dict[int, torch.Tensor] = {}
    for c, T in terms:
        key = id(T)
        if key in coef:
            coef[key] = coef[key] + c
        else:
            coef[key], tensor[key] = c, T
    out = None
    for key, c in coef.items():
        T = tensor[key]
        if isinstance(c, torch.Tensor):
            c = c.to(T.dtype)
            out = T * c if out is None else out.addcmul_(T, c)
        elif c != 0:
            out = T * c if out is None else out.add_(T, alpha=c)
    return torch.zeros_like(terms[0][1]) if out is None else out
