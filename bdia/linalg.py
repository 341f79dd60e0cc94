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
    """``sum_i c_i T_i`` with terms on the same tensor object merged first; always a fresh tensor.

    Half-precision terms are accumulated in float32 and the sum rounded once at the end: merged coefficients
    can be large and cancel (an x0 model's eps at sigma = 0.002 carries 1/sigma = 500), and a float16 partial
    sum would overflow where the result does not.
    """
    coef: dict[int, Coef] = {}
    tensor: dict[int, torch.Tensor] = {}
    for c, T in terms:
        key = id(T)
        if key in coef:
            coef[key] = coef[key] + c
        else:
            coef[key], tensor[key] = c, T
    dtype = terms[0][1].dtype
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    out = None
    for key, c in coef.items():
        T = tensor[key]
        if isinstance(c, torch.Tensor):
            c = c.to(acc)
            out = (T if acc is dtype else T.to(acc)) * c if out is None else out.addcmul_(T, c)
        elif c != 0:
            out = (T if acc is dtype else T.to(acc)) * c if out is None else out.add_(T, alpha=c)
    if out is None:
        return torch.zeros_like(terms[0][1])
    return out if acc == dtype else out.to(dtype)
