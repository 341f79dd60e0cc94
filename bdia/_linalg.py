"""Linear combinations of tensors with float64 coefficients: the one arithmetic kernel of every step.

Every update in this library (a DDIM step, a BDIA step and its inverse, a change of parametrisation) is
a linear combination of a few tensors whose coefficients come from float64 time arithmetic.
``lincomb`` merges coefficients of the same tensor (in float64, before touching any tensor: fewer
passes over memory and no cancellation between large tensor terms) and casts each coefficient to the
state's dtype only when it is applied. A zero coefficient still multiplies its tensor, so that NaN
or inf in any input shows in the result (IEEE: 0 x inf = NaN): a walk's final state then carries
every non-finite value that any of its steps made (``bdia.sampling`` checks that state once). It
never modifies its inputs. ``factored`` gives the same sum as a scale and a tensor, for an update that
adds it to something else; ``lincomb`` is ``factored`` with the scale applied.
"""

from __future__ import annotations

import torch

__all__ = ["Coef", "Terms", "factored", "factored2", "lincomb"]

Coef = float | torch.Tensor  # a python float (float64), or a per-sample tensor broadcastable to the terms
Terms = list[tuple[Coef, torch.Tensor]]


_ZERO = torch.zeros(())  # a CPU scalar: usable with a tensor of any float dtype and any device
_HALF = (torch.float16, torch.bfloat16)


def lincomb(*terms: tuple[Coef, torch.Tensor]) -> torch.Tensor:
    """``sum_i c_i T_i`` with terms on the same tensor object merged first; always a fresh tensor.

    Computed as ``s T`` from ``factored``: one pass over memory per distinct tensor.
    """
    s, T = factored(*terms)
    return T if s == 1.0 else T.mul_(s)


def factored(*terms: tuple[Coef, torch.Tensor]) -> tuple[Coef, torch.Tensor]:
    """``(s, T)`` with ``s T = sum_i c_i T_i`` (to rounding) and ``T`` a fresh tensor, one pass cheaper than the sum.

    The coefficient of largest magnitude is factored out, so its tensor enters ``T`` with coefficient 1 and
    the first two terms cost one ``torch.add`` (ratios ``c_i / s`` lie in [-1, 1]: nothing overflows). A
    consumer that adds ``s T`` to another tensor does so through add's ``alpha`` and pays nothing for the
    scale: BDIA's ``x_prev + s T`` then makes two passes over memory in all, where ``x_prev + F`` makes three.

    Half-precision terms are accumulated in float32 and the sum rounded once at the end, unfactored
    (``s = 1``): merged coefficients can be large and cancel (an x0 model's eps at sigma = 0.002 carries
    1/sigma = 500), and a float16 partial sum would overflow where the result does not. Per-sample (tensor)
    coefficients are not factored either.
    """
    tensors, coefs = _merged(terms)
    if len(coefs) == 2:
        return factored2(coefs[0], tensors[0], coefs[1], tensors[1])
    return _factored(tensors, coefs)


def factored2(a: Coef, U: torch.Tensor, b: Coef, V: torch.Tensor) -> tuple[Coef, torch.Tensor]:
    """``factored((a, U), (b, V))`` for two distinct tensors: the common case (a step's latent and its network's
    output), decided without building term lists."""
    if type(a) is float and type(b) is float and U.dtype not in _HALF and a == a and b == b:
        if abs(b) > abs(a):  # the larger leads (the first on a tie), as in the general loop
            return b, torch.add(V, U, alpha=a / b)
        if a != 0:
            return a, torch.add(U, V, alpha=b / a)
    return _factored([U, V], [a, b])


def _factored(tensors: list[torch.Tensor], coefs: list[Coef]) -> tuple[Coef, torch.Tensor]:
    s, lead, factor = 0.0, 0, tensors[0].dtype not in _HALF
    for i, c in enumerate(coefs):
        if type(c) is not float:
            factor = False
        elif abs(c) > abs(s):
            s, lead = c, i
    if not factor or s == 0:  # (s == 0: all zero, or NaN, which must show)
        return 1.0, _summed(tensors, coefs)
    out = None
    for i, c in enumerate(coefs):
        if i != lead:
            T = tensors[i]
            out = torch.add(tensors[lead], T, alpha=c / s) if out is None else out.add_(T, alpha=c / s)
    return s, (tensors[lead].clone() if out is None else out)


def _summed(tensors: list[torch.Tensor], coefs: list[Coef]) -> torch.Tensor:
    """The sum term by term, accumulated in float32 for half precision and rounded once."""
    dtype = tensors[0].dtype
    half = dtype in _HALF
    out = None
    for T, c in zip(tensors, coefs, strict=True):
        if half:
            T = T.to(torch.float32)
        if isinstance(c, torch.Tensor):
            c = c.to(T.dtype)
            out = torch.mul(T, c) if out is None else out.addcmul_(T, c)
        else:
            # 0 + c T through add's alpha is c T to the bit (but -0 -> +0), and skips the wrapping of a python
            # scalar into a tensor that T * c pays for (about 2 us a call, as much as a pass over 64k floats)
            out = torch.add(_ZERO, T, alpha=c) if out is None else out.add_(T, alpha=c)
    return out.to(dtype) if half else out


def _merged(terms: tuple[tuple[Coef, torch.Tensor], ...]) -> tuple[list[torch.Tensor], list[Coef]]:
    """The distinct tensors (by identity, in order of first appearance) and their summed coefficients."""
    # A step has a handful of distinct tensors: a linear scan by identity beats hashing here.
    tensors: list[torch.Tensor] = []
    coefs: list[Coef] = []
    for c, T in terms:
        for i, U in enumerate(tensors):
            if U is T:
                coefs[i] = coefs[i] + c
                break
        else:
            tensors.append(T)
            coefs.append(c)
    return tensors, coefs
