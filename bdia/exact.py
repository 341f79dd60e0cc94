"""Exact fixed-point BDIA: integer states and exact multiplication by a fraction (MacKay et al., NeurIPS 2018).

``Exact(BDIA(...))`` runs the wrapped BDIA solver (any integrator, any gamma > 0, constant or per step)
on integer states ``X = round(x 2^k)``. One step is ``X_next = gamma * X_prev + round(2^k F(x))`` with
``F(x) = Phi(x; t -> t_next) - gamma Phi_b(x; t -> t_prev)`` evaluated by the model on the dequantised
state ``x = X 2^-k`` (in the caller's dtype). ``gamma = p/q`` is applied with MacKay et al.'s (2018,
after Maclaurin et al. 2015) exactly reversible multiplication by a fraction, which moves the low digits
that the multiplication destroys into an integer *information buffer* carried in the state, so that
``unstep(step(s))`` returns the identical bits whatever gamma is. Order and NFE per step: those of the
wrapped solver (1 NFE for BDIA-DDIM/Euler); the integer work is a few element-wise passes.

Information: a contraction by p/q destroys log2(q/p) bits per element; the buffer grows by exactly that
on average (plus < 1 bit once per run from rounding), the information-theoretic minimum (docs/exactness.md).
The buffer is an int64 tensor; when it could overflow, its low 31 bits are spilled to a stack of int32
tensors (a decision made from a data-independent bound, so no host sync) and merged back on the way back.

Determinism: exactness needs the model to return the same bits for the same input bits. On CUDA pass
``deterministic=True`` to run every call under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, NamedTuple

import torch

from bdia.gamma import PerSample
from bdia.models import Denoiser
from bdia.schedules import Schedule
from bdia.solvers import BDIA
from bdia.state import State, _pair, _provenance, check_latent, check_state

__all__ = ["Exact", "ExactState", "Fixed", "SideInformation", "default_frac_bits", "fraction"]

SPILL_BITS = 31  # bits per spilled word: an int32 that stays non-negative
_MASK = (1 << SPILL_BITS) - 1
_BUFFER_ROOM = Fraction(2**62)  # the buffer is multiplied by q only while (buffer + 1) q <= 2^62
_STATE_ROOM = 2**61  # |X| bound that keeps gamma X_prev + F inside int64 with a bit to spare
MAX_DENOMINATOR = 2**30  # q <= 2^30 keeps buffer * q and a freshly spilled buffer inside int64


@lru_cache(maxsize=4096)
def fraction(gamma: float, max_numerator: int = 1024) -> tuple[int, int]:
    """The fraction ``p/q`` (``p <= max_numerator``) that the exact mode uses for ``gamma > 0``.

    ``q/p`` is the best rational approximation of ``1/gamma`` with denominator at most ``max_numerator``
    (continued fractions, ``Fraction.limit_denominator``): the side information per step, ``log2(q/p)``, is
    then the closest possible to ``log2(1/gamma)``, and the per-step rounding error, below ``p + 1/2``
    units of ``2^-k``, stays small. gamma = 0.5 is 1/2, 0.1 is 1/10, 0.94 is 47/50; gamma = 1 is 1/1.
    A per-step gamma above 1 (O-BELM on some grids) is allowed: the multiplication is reversible for any p/q.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, int | float):
        raise TypeError(f"gamma must be a python float > 0 in exact mode, got {type(gamma).__name__}")
    if isinstance(max_numerator, bool) or not isinstance(max_numerator, int) or max_numerator < 16:
        # best approximations satisfy |1/gamma - q/p| < 1/(p P), so log2(q/p) is within 1.45/P bits of log2(1/gamma)
        raise ValueError(f"max_numerator must be an int >= 16 (0.1 bit of side information), got {max_numerator!r}")
    # gamma > 1 (O-BELM's per-step gamma on some grids) works too: the buffer then gives bits back
    if not (math.isfinite(gamma) and 0.0 < gamma <= max_numerator):
        raise ValueError(f"gamma must lie in (0, {max_numerator}] in exact mode (0 cannot be inverted), got {gamma}")
    # q <= 2^30 caps p at 2^30 gamma; then 1/gamma > 2^30 / P is so large that p = 1 is accurate to 0.5/2^20
    cap = max(1, min(max_numerator, math.floor(MAX_DENOMINATOR * gamma)))
    r = (Fraction(1) / Fraction(gamma)).limit_denominator(cap)
    q, p = r.numerator, r.denominator
    if q > MAX_DENOMINATOR:
        raise ValueError(f"gamma={gamma} is too small for the exact mode (1/gamma must be below {MAX_DENOMINATOR})")
    return p, q


def default_frac_bits(dtype: torch.dtype) -> int:
    """Fractional bits k for a state dtype: ``mantissa bits + 7``, at most 50.

    A step's rounding error is below ``(p + 1/2) 2^-k`` with ``p <= 1024``, so k = mantissa + 7 keeps it
    within the dtype's spacing at ``|x| = 8`` (float32: k = 30, error <= 2^-20). float64 is capped at 50
    so that latents up to ``|x| < 2^11`` fit int64 with room (resolution 2^-50 ~ 9e-16, error per step
    <= 2^-40 ~ 1e-12 for p = 1024).
    """
    if not dtype.is_floating_point:
        raise TypeError(f"the state dtype must be floating point, got {dtype}")
    mantissa = -round(math.log2(torch.finfo(dtype).eps))  # stored mantissa bits: 23 for float32
    return min(mantissa + 7, 50)


@dataclass(frozen=True)
class Spill:
    """31 low bits of the buffer, moved out when it could overflow, and when that happened."""

    low: torch.Tensor  # int32, non-negative
    when: tuple[float, float, float]  # (t_prev, t, t_next) of the step that spilled
    after: Fraction  # the buffer bound right after that step (identifies it on the way back)
    before: Fraction  # the bound before the spill (restored on the way back)


@dataclass(frozen=True)
class Fixed:
    """The integer side of an exact state: the pair, the information buffer and its spilled words.

    ``bound`` is a data-independent bound (``buffer + 1 <= bound`` on walks made by ``step``), updated by
    exact rational arithmetic in both directions, so that spills and merges happen at the same steps.
    """

    X_prev: torch.Tensor
    X: torch.Tensor
    buffer: torch.Tensor
    stack: tuple[Spill, ...]
    bound: Fraction
    frac_bits: int
    peak: torch.Tensor | None = None  # the largest |X| any step asked for, per sample (float64, on the device)


@dataclasses.dataclass(frozen=True, eq=False)
class ExactState(State):
    """A ``State`` whose floats are the dequantised integers ``X 2^-k`` of ``fixed`` (the authoritative value).

    NaN marks an element whose integer left the safe range (``bdia.sample``'s finite check then raises).
    The floats are a view of the integers: an in-place edit of ``x`` or ``x_prev`` is detected (by the tensors'
    version counters) and refused when the state is continued; ``replace`` keeps ``fixed`` unless it is given.
    """

    fixed: Fixed | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "_versions", _versions(self))

    def replace(self, **changes: Any) -> ExactState:
        if ("x" in changes or "x_prev" in changes) and "fixed" not in changes:
            raise ValueError(
                "the floats of an ExactState are a view of its integers (fixed): replace fixed with them, or lift a "
                "plain State with Exact.lift"
            )
        return dataclasses.replace(self, **changes)

    def __getitem__(self, rows: Any) -> ExactState:
        """The samples ``rows`` with their integers, buffer and spilled words: every one of them is per element
        (only the data-independent bounds are shared), so inverting a selection is as exact as the whole batch."""
        base, f = State.__getitem__(self, rows), self.fixed
        if f is None:
            return base  # type: ignore[return-value]
        r = _rows(rows)
        g = dataclasses.replace(
            f,
            X_prev=f.X_prev[r],
            X=f.X[r],
            buffer=f.buffer[r],
            stack=tuple(dataclasses.replace(sp, low=sp.low[r]) for sp in f.stack),
            peak=None if f.peak is None else f.peak[r],
        )
        return dataclasses.replace(self, x_prev=base.x_prev, x=base.x, fixed=g)

    def flipped(self) -> ExactState:
        f = self.fixed
        g = None if f is None else dataclasses.replace(f, X_prev=f.X, X=f.X_prev)
        return dataclasses.replace(self, x_prev=self.x, x=self.x_prev, t_prev=self.t, t=self.t_prev, fixed=g)

    def to(self, *args: Any, **kwargs: Any) -> ExactState:
        """The integers move to the new device; the floats are dequantised again in the new dtype (exact: the
        integers, not the floats, are the state)."""
        f = self.fixed
        if f is None:
            return super().to(*args, **kwargs)  # type: ignore[return-value]
        moved = torch.empty(0, dtype=self.x.dtype, device=self.x.device).to(*args, **kwargs)  # where and what
        device = moved.device
        g = dataclasses.replace(
            f,
            X_prev=f.X_prev.to(device),
            X=f.X.to(device),
            buffer=f.buffer.to(device),
            stack=tuple(dataclasses.replace(sp, low=sp.low.to(device)) for sp in f.stack),
            peak=None if f.peak is None else f.peak.to(device),
        )
        k, dt = f.frac_bits, moved.dtype
        xp = dequantise(g.X_prev, k, dt, ~torch.isnan(self.x_prev).to(device))
        x = dequantise(g.X, k, dt, ~torch.isnan(self.x).to(device))
        return dataclasses.replace(self, x_prev=xp, x=x, fixed=g)

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        f = self.fixed
        if f is not None:
            d["fixed"] = {
                "X_prev": f.X_prev,
                "X": f.X,
                "buffer": f.buffer,
                "bound": [f.bound.numerator, f.bound.denominator],
                "frac_bits": f.frac_bits,
                "peak": f.peak,
                "stack": [
                    {
                        "low": sp.low,
                        "when": list(sp.when),
                        "after": [sp.after.numerator, sp.after.denominator],
                        "before": [sp.before.numerator, sp.before.denominator],
                    }
                    for sp in f.stack
                ],
            }
        return d

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> ExactState:
        base, fd = State._from_dict(d), d.get("fixed")
        fixed = None
        if fd is not None:
            stack = tuple(
                Spill(sp["low"], tuple(float(w) for w in sp["when"]), Fraction(*sp["after"]), Fraction(*sp["before"]))
                for sp in fd["stack"]
            )
            fixed = Fixed(
                fd["X_prev"],
                fd["X"],
                fd["buffer"],
                stack,
                Fraction(*fd["bound"]),
                int(fd["frac_bits"]),
                _per_sample(fd.get("peak"), fd["X"]),
            )
        return ExactState(base.x_prev, base.x, base.t_prev, base.t, base.coupled, fixed=fixed, **_provenance(d))


def _per_sample(peak: torch.Tensor | None, X: torch.Tensor) -> torch.Tensor | None:
    """A stored peak, one per sample (files written before it was per sample hold the batch's maximum)."""
    if peak is None or peak.dim() == 1:
        return peak
    return peak.reshape(()).expand(X.shape[0]).clone()


def _rowmax(t: torch.Tensor) -> torch.Tensor:
    """``|t|``'s largest element per sample, float64 (every other part of an exact state is per element too, so
    that ``state[rows]`` and joining shards keep it exact)."""
    flat = t.detach().abs().reshape(t.shape[0], -1)
    if flat.shape[1] == 0:
        return flat.new_zeros(t.shape[0], dtype=torch.float64)
    return flat.amax(1).double()


def _peak(before: torch.Tensor | None, need: torch.Tensor) -> torch.Tensor:
    # fmax: a NaN that follows an overflow (the model evaluated on NaN) must not erase the size that overflowed
    return need if before is None else torch.fmax(before, need)


def _rows(rows: Any) -> Any:
    return slice(rows, rows + 1 or None) if isinstance(rows, int) else rows


def _versions(s: State) -> tuple[int, int] | None:
    try:
        return s.x_prev._version, s.x._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class SideInformation(NamedTuple):
    """Side information held by an exact state: information bits and storage bytes, per latent element."""

    bits: float  # log2(buffer + 1) averaged over elements, plus 31 bits per spilled word
    bytes: float  # the int64 buffer plus 4 bytes per spilled word
    spills: int


def quantise(x: torch.Tensor, frac_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(x 2^k)`` as int64 (ties to even, in float64: exact for every float dtype) and an in-range mask."""
    y = torch.round(x.to(torch.float64) * 2.0**frac_bits)
    ok = y.abs() < _STATE_ROOM  # also False for NaN
    return torch.where(ok, y, 0.0).to(torch.int64), ok


def dequantise(X: torch.Tensor, frac_bits: int, dtype: torch.dtype, ok: torch.Tensor | None = None) -> torch.Tensor:
    """``X 2^-k`` in ``dtype`` (through float64, so that no half-precision intermediate overflows); NaN where not ok."""
    x = X.to(torch.float64) * 2.0**-frac_bits
    if ok is not None:
        x = torch.where(ok, x, math.nan)
    return x.to(dtype)


class _DeterministicMode:
    """``torch.use_deterministic_algorithms(True)`` for as long as any exact walk needs it, in any thread.

    The flag is process-global: a save-and-restore per call, interleaved across threads, can restore another
    thread's "on" and leave it on for good. Entries are counted under a lock instead: the first turns the mode on
    (remembering the caller's setting), the last restores that setting.
    """

    def __init__(self) -> None:
        self.lock, self.depth, self.saved = threading.Lock(), 0, (False, False)

    @contextlib.contextmanager
    def __call__(self, on: bool) -> Iterator[None]:
        if not on:
            yield
            return
        with self.lock:
            if self.depth == 0:
                self.saved = (
                    torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled(),
                )
                # cuBLAS needs a fixed workspace for reproducible GEMMs; it must be set before cuBLAS initialises
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0:
                    before, warn = self.saved
                    torch.use_deterministic_algorithms(before, warn_only=warn)


_deterministic = _DeterministicMode()


class Exact:
    """BDIA in exact fixed-point arithmetic: ``unstep(step(s))`` is ``s`` to the bit for every gamma > 0.

    ``Exact(BDIA(integrator, gamma))``: ``frac_bits`` (k, default ``default_frac_bits(state dtype)``) sets the
    resolution 2^-k; ``max_numerator`` bounds the fraction ``p/q`` that replaces gamma (see ``fraction``);
    ``deterministic=True`` runs every model call under ``torch.use_deterministic_algorithms(True)``.
    Works with ``bdia.sample`` / ``bdia.invert`` unchanged; states are ``ExactState`` (a ``State`` whose
    floats are the dequantised integers). A plain ``State`` or latent passed in is quantised first.
    """

    def __init__(
        self,
        solver: BDIA | None = None,
        frac_bits: int | None = None,
        *,
        max_numerator: int = 1024,
        deterministic: bool = False,
    ):
        self.solver = BDIA() if solver is None else solver
        if not isinstance(self.solver, BDIA):
            raise TypeError(f"solver must be a bdia.solvers.BDIA, got {type(self.solver).__name__}")
        if isinstance(self.solver.gamma, PerSample):
            raise TypeError("the exact mode takes a float gamma or a per-step gamma function, not a per-sample tensor")
        if self.solver.gamma.constant == 0.0:
            raise ValueError(
                "Exact(BDIA(gamma=0)) cannot be inverted (gamma = 0 is the plain integrator, which forgets x_prev): "
                "use gamma > 0"
            )
        if frac_bits is not None and (isinstance(frac_bits, bool) or not isinstance(frac_bits, int)):
            raise TypeError(f"frac_bits must be an int or None, got {type(frac_bits).__name__}")
        if frac_bits is not None and not (0 <= frac_bits <= 60):
            raise ValueError(f"frac_bits must lie in [0, 60], got {frac_bits}")
        fraction(1.0, max_numerator)  # validates max_numerator
        self.frac_bits, self.max_numerator, self.deterministic = frac_bits, max_numerator, deterministic
        self.nfe, self.order = self.solver.nfe, self.solver.order
        # the float BDIA with gamma replaced by p/q: its drift F(x) is what each step rounds to the grid
        self.surrogate = BDIA(self.solver.integrator, gamma=self.effective_gamma, backward=self.solver.backward)

    # -- the fraction and the float surrogate ----------------------------------------------------------

    def _fraction_at(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> tuple[int, int]:
        return fraction(self.solver.gamma.bounds(schedule, t_prev, t, t_next)[0], self.max_numerator)

    def effective_gamma(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> float:
        """The gamma this mode actually applies, ``p/q`` (a per-step gamma function for a float ``BDIA``)."""
        p, q = self._fraction_at(schedule, t_prev, t, t_next)
        return p / q

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """Integer arithmetic: a walk and its inverse meet to the bit, nothing is amplified."""
        return 1.0

    @property
    def identity(self) -> str:
        return f"Exact({self.solver.identity}, frac_bits={self.frac_bits}, max_numerator={self.max_numerator})"

    def describe_nonfinite(self, state: State) -> str:
        """What went wrong when a walk produced NaN: the fixed-point range left (by how much, and what to pass
        instead), or a non-finite model output."""
        f = state.fixed if isinstance(state, ExactState) else None
        if f is None or f.peak is None:
            return "check the model output and the grid's end points"
        k = f.frac_bits
        if f.peak.numel() == 0:
            return "check the model output and the grid's end points"
        limit, peak = 2.0 ** (61 - k), float(f.peak.max()) * 2.0**-k  # (one host sync, after the walk)
        if not math.isfinite(peak):
            return "the model (or the float surrogate step) produced NaN or inf: check the model output"
        if peak < limit:
            return "the fixed-point range was not left; check the model output and the grid's end points"
        short = math.ceil(math.log2(peak / limit)) + 1
        return (
            f"the exact mode's fixed-point range |x| < 2^(61 - frac_bits) = {limit:.3g} (frac_bits = {k}) was left: "
            f"the walk asked for |x| up to {peak:.3g}, {peak / limit:.3g} times the range; pass frac_bits={k - short} "
            "or less (each bit less doubles the range and halves the resolution 2^-frac_bits), or check the model "
            "output"
        )

    # -- integer helpers --------------------------------------------------------------------------------

    def _bits_for(self, dtype: torch.dtype) -> int:
        return default_frac_bits(dtype) if self.frac_bits is None else self.frac_bits

    def lift(self, state: State) -> ExactState:
        """An ``ExactState`` for ``state``: itself, or the quantised pair with an empty buffer."""
        if isinstance(state, ExactState):
            check_state(state)
            if state.fixed is None:
                raise ValueError("an ExactState without its integers (fixed=None) cannot be continued exactly")
            if state._versions is not None and _versions(state) != state._versions:
                raise ValueError(
                    "the float latents of this ExactState were modified in place; they are only a view of its integers "
                    "(state.fixed), which were not: build a new state (Exact.lift of a plain bdia.State) instead"
                )
            k = state.fixed.frac_bits
            if self.frac_bits is not None and k != self.frac_bits:
                raise ValueError(f"state has frac_bits={k} but this solver uses frac_bits={self.frac_bits}")
            return state
        check_state(state)
        k = self._bits_for(state.x.dtype)
        (Xp, okp), (X, ok) = quantise(state.x_prev, k), quantise(state.x, k)
        fixed = Fixed(Xp, X, torch.zeros_like(X), (), Fraction(1), k)
        dt = state.x.dtype
        return ExactState(dequantise(Xp, k, dt, okp), dequantise(X, k, dt, ok), state.t_prev, state.t, fixed=fixed)

    # -- the solver protocol ----------------------------------------------------------------------------

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> ExactState:
        x = check_latent(x)
        k = self._bits_for(x.dtype)
        X0, ok0 = quantise(x, k)
        x0 = dequantise(X0, k, x.dtype, ok0)
        with _deterministic(self.deterministic):
            x1 = self.solver.integrator(model, x0, t, t_next, **kw)
        X1, ok1 = quantise(x1, k)
        fixed = Fixed(X0, X1, torch.zeros_like(X0), (), Fraction(1), k, _rowmax(x1) * 2.0**k)
        return ExactState(x0, dequantise(X1, k, x.dtype, ok0 & ok1), t, t_next, fixed=fixed)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> ExactState:
        s = self.lift(_pair(state, self))
        f, x, t, t_prev = s.fixed, s.x, s.t, s.t_prev
        p, q = self._fraction_at(model.schedule, t_prev, t, t_next)
        with _deterministic(self.deterministic):
            drift = self.surrogate.drift(model, x, t_prev, t, t_next, **kw).tensor()
        F, okF = quantise(drift, f.frac_bits)
        Y, buffer, stack, bound = _multiply(f.X_prev, f.buffer, f.stack, f.bound, p, q, (t_prev, t, t_next))
        ok = okF & (Y.abs() < _STATE_ROOM)
        X_next = Y + F
        # how large a state this step asked for (|gamma X_prev| + |F|), for the error message if it overflowed
        need = _rowmax(drift) * 2.0**f.frac_bits + _rowmax(Y)
        fixed = Fixed(f.X, X_next, buffer, stack, bound, f.frac_bits, _peak(f.peak, need))
        return ExactState(x, dequantise(X_next, f.frac_bits, x.dtype, ok), t, t_next, fixed=fixed)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> ExactState:
        s = self.lift(_pair(state, self))
        f, x, t, t_next = s.fixed, s.x_prev, s.t_prev, s.t  # x: the shared point x_i
        p, q = self._fraction_at(model.schedule, t_prev, t, t_next)
        if p != q and s is not state:
            raise ValueError(
                "inverting a plain bdia.State in the exact mode with gamma != 1 cannot be exact: the information "
                "buffer that sampling filled is not in it; pass the ExactState that sampling returned (state[rows] "
                "selects samples of a batch exactly)"
            )
        with _deterministic(self.deterministic):
            drift = self.surrogate.drift(model, x, t_prev, t, t_next, **kw).tensor()
        F, okF = quantise(drift, f.frac_bits)
        Y = f.X - F
        X_prev, buffer, stack, bound, okY = _divide(Y, f.buffer, f.stack, f.bound, p, q, (t_prev, t, t_next))
        need = (_rowmax(drift) * 2.0**f.frac_bits + _rowmax(f.X)) * (q / p)
        fixed = Fixed(X_prev, f.X_prev, buffer, stack, bound, f.frac_bits, _peak(f.peak, need))
        ok = okF & okY & (X_prev.abs() < _STATE_ROOM)
        return ExactState(dequantise(X_prev, f.frac_bits, x.dtype, ok), x, t_prev, t, fixed=fixed)

    # -- reporting --------------------------------------------------------------------------------------

    @staticmethod
    def side_information(state: ExactState) -> SideInformation:
        """Information bits and storage bytes per latent element held in the state's buffer and spills."""
        f = state.fixed
        n = len(f.stack)
        bits = float(torch.log2(f.buffer.to(torch.float64) + 1).mean()) + SPILL_BITS * n
        return SideInformation(bits, 8.0 + 4.0 * n, n)

    def __repr__(self) -> str:
        return f"Exact({self.solver!r}, frac_bits={self.frac_bits}, max_numerator={self.max_numerator})"


def _multiply(Y, buffer, stack, bound, p: int, q: int, when):
    """``Y * p/q`` exactly reversibly (MacKay et al. 2018, Algorithm 1): the digit ``Y mod q`` that the
    division destroys is pushed onto the buffer, and the digit ``buffer mod p`` that the multiplication
    by p leaves free is popped from it. Floor semantics throughout, so negative Y works."""
    if p == q:
        return Y, buffer, stack, bound
    before, used = bound, max(bound, Fraction(1))
    spill = None
    if used * q > _BUFFER_ROOM:
        spill = (buffer & _MASK).to(torch.int32)
        buffer = buffer >> SPILL_BITS
        used = used / 2**SPILL_BITS + 1
    buffer = buffer * q + torch.remainder(Y, q)
    Y = torch.div(Y, q, rounding_mode="floor")
    Y = Y * p + torch.remainder(buffer, p)
    buffer = torch.div(buffer, p, rounding_mode="floor")
    after = (used * q + p - 1) / p  # buffer' + 1 <= ((buffer + 1) q + p - 1) / p
    if spill is not None:
        stack = (*stack, Spill(spill, when, after, before))
    return Y, buffer, stack, after


def _divide(Y, buffer, stack, bound, p: int, q: int, when):
    """The exact inverse of ``_multiply``; also returns a mask of elements that stayed in int64's range
    (only walks that do not retrace a ``step``, such as inverting real data, can leave it)."""
    if p == q:
        return Y, buffer, stack, bound, torch.ones_like(Y, dtype=torch.bool)
    buffer = buffer * p + torch.remainder(Y, p)
    Y = torch.div(Y, p, rounding_mode="floor")
    ok = Y.abs() < _STATE_ROOM // q
    Y = Y * q + torch.remainder(buffer, q)
    buffer = torch.div(buffer, q, rounding_mode="floor")
    used = (bound * p - p + 1) / q
    if stack and stack[-1].when == when and stack[-1].after == bound:
        top = stack[-1]
        ok = ok & (buffer <= _MASK)
        buffer = (buffer << SPILL_BITS) | top.low.to(torch.int64)
        return Y, buffer, stack[:-1], top.before, ok
    return Y, buffer, stack, used, ok
