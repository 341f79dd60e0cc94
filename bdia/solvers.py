"""Reversible solvers (BDIA, O-BELM, EDICT) on an explicit ``State``, and what every solver shares.

A solver offers ``init``, ``step``, ``unstep`` and ``amplification`` (the protocol is ``bdia.protocols.Solver``);
BDIA also turns a whole walk into a plan computed once (``BDIA.plan``). The integrators of ``bdia.integrators``
(Euler, DDIM, DDIMInverse, Heun, ScaledHeun, DPMSolver2) are one-step solvers and are re-exported here.
``identity(solver)`` names the scheme a state was made with; ``linear_growth`` estimates a walk's amplification of
rounding for any solver (docs/theory.md, "Rounding").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, NamedTuple

import torch

from bdia._linalg import Coef, factored, lincomb
from bdia.gamma import BoundedOBELM, Gamma, GammaFn, as_gamma, obelm_gamma
from bdia.integrators import DDIM, DDIMInverse, DPMSolver2, Euler, Heun, Integrator, ScaledHeun
from bdia.models import Denoiser, Prediction, fold
from bdia.protocols import Solver, Stepping
from bdia.schedules import Schedule
from bdia.state import State, _coupled, _pair, _provenance

__all__ = [
    "BDIA",
    "DDIM",
    "EDICT",
    "OBELM",
    "BoundedOBELM",
    "DDIMInverse",
    "DPMSolver2",
    "EDICTState",
    "Euler",
    "Heun",
    "Integrator",
    "ScaledHeun",
    "Solver",
    "identity",
    "linear_growth",
    "obelm_gamma",
]


def identity(solver: object) -> str | None:
    """The scheme ``solver`` runs, as a string (``BDIA(DDIM(), gamma=1.0, backward=DDIM())``), or ``None``.

    Two solvers with one identity make the same steps: a state made by one continues exactly with the other.
    ``bdia.sample`` / ``bdia.invert`` stamp it on the states they return and refuse to continue a state with a
    solver of another identity. One-step integrators have none (they ignore the older latent of a pair, and their
    inversion is approximate anyway), nor have solvers that do not define ``identity``: neither is checked.
    """
    return getattr(solver, "identity", None)


class _Drift(NamedTuple):
    """BDIA's update split as ``x_next = gamma x_prev + F`` with ``F = scale T``.

    ``T`` is computed once per evaluation, from the same terms in the same order whichever way the walk goes, so
    it has the same bits in ``step`` and ``unstep``, and ``scale T`` enters both through add's ``alpha``: a round
    trip sees only the rounding of ``gamma x_prev + F`` and of its inverse. ``forward`` and ``inverse`` write over
    ``T`` (a fresh tensor: use a drift once), or into ``into``, a tensor the caller no longer needs.
    """

    gamma: Coef  # python float, or float64 per sample shaped to broadcast
    scale: Coef
    T: torch.Tensor

    def tensor(self) -> torch.Tensor:
        """``F`` itself (a fresh tensor; ``T`` is kept)."""
        return self.T * self.scale if self.scale != 1.0 else self.T.clone()

    def forward(self, x_prev: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``gamma x_prev + F``."""
        g, s, T = self
        out = _writable(T, into, x_prev)
        if type(g) is float and g == 1.0:
            return torch.add(x_prev, T, alpha=s, out=out)  # two passes over memory for the whole gamma = 1 step
        if isinstance(g, torch.Tensor):  # (T is read after the product, which cannot be written over it)
            return torch.mul(x_prev, g.to(x_prev.dtype), out=None if out is T else out).add_(T, alpha=s)
        if g == 0.0:
            return torch.mul(T, s, out=out)  # the plain integrator's update, to the bit
        return torch.add(x_prev, T, alpha=s / g, out=out).mul_(g)  # g (x_prev + (s/g) T): three passes

    def inverse(self, x_next: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """``(x_next - F) / gamma``: the exact inverse of ``forward`` in exact arithmetic."""
        g, s, T = self
        out = _writable(T, into, x_next)
        if isinstance(g, torch.Tensor):
            return torch.add(x_next, T, alpha=-s, out=out).div_(g.to(T.dtype))
        if g == 1.0:
            return torch.add(x_next, T, alpha=-s, out=out)
        # forward's g (x_prev + (s/g) T) undone in reverse order, (s/g) T the same product both ways (T is read after
        # the division, so the quotient cannot be written over it)
        return torch.div(x_next, g, out=None if out is T else out).add_(T, alpha=-s / g)


def _writable(T: torch.Tensor, into: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor | None:
    """Where an update may write: ``into`` if given, else over ``T`` (a fresh intermediate: it saves an allocation).
    Autograd refuses ``out=``, so a recorded step allocates (``None``)."""
    if torch.is_grad_enabled() and (other.requires_grad or T.requires_grad):
        return None
    return T if into is None else into


class BDIA:
    """BDIA (Zhang, Lewis & Kleijn, ECCV 2024, arXiv 2307.10829, eq. 14): an exactly invertible two-step scheme.

        x_next = gamma x_prev + F(x),   F(x) = Phi(x; t -> t_next) - gamma Phi_b(x; t -> t_prev)     (step)
        x_prev = (x_next - F(x)) / gamma                                                            (unstep)

    ``integrator`` is ``Phi``; ``backward`` is ``Phi_b``, by default the integrator's first-order step that reuses
    the shared evaluation at ``x`` (so BDIA over DDIM or Euler costs 1 NFE per step, over Heun 2). ``gamma``: a
    float in [0, 1], a ``(batch,)`` tensor of them, a per-step function ``gamma(schedule, t_prev, t, t_next)``
    (e.g. ``obelm_gamma``), or a ``bdia.gamma.Gamma``. gamma = 0 is the plain integrator; gamma = 1 the symmetric
    scheme. Order: 2 for gamma = 1 with the same method both ways (a leapfrog-type scheme) and for O-BELM's gamma,
    else the lower of the integrator's and the backward step's (1 with the default first-order backward step).
    Inversion divides by gamma: rounding errors grow like ``gamma^-N`` (docs/theory.md), and inverting with
    gamma = 0 is an error. The walk's first step is a plain integrator step (there is no older point yet).

    A solver is a value: configure a new one rather than changing one's attributes (a walk's plan is kept per
    solver).
    """

    nonfinite_persists = True  # x_next includes x through F and x_prev (checked once per walk)

    def __init__(
        self,
        integrator: Integrator | None = None,
        gamma: float | torch.Tensor | GammaFn | Gamma = 1.0,
        backward: Integrator | None = None,
    ):
        self.integrator = DDIM() if integrator is None else integrator
        _check_integrator(self.integrator, "integrator")
        self.backward = self.integrator.first_order if backward is None else backward
        _check_integrator(self.backward, "backward")
        self.gamma = as_gamma(gamma)
        self.nfe = self.integrator.nfe + self.backward.nfe - 1
        # the same map both ways: the same step function, or (BDIA uses an affine map's coefficients alone) the same
        # coefficients (DDIMInverse's are DDIM's)
        same = type(self.backward) is type(self.integrator) or (
            self.affine and type(self.integrator).coefficients is type(self.backward).coefficients
        )
        symmetric = self.gamma.constant == 1.0 and same
        fn = getattr(self.gamma, "fn", None)
        # O-BELM's gamma (published or bounded) cancels the leading error of a single-evaluation step (measured: DDIM,
        # Euler); over a multi-stage integrator with a first-order backward step it does not
        obelm = (fn is obelm_gamma or isinstance(fn, BoundedOBELM)) and self.affine
        # The correction gamma (x_prev - Phi_b(x)) carries the backward step's local error: the scheme keeps the
        # lower of the two orders, except the symmetric gamma = 1 scheme and O-BELM, where the leading errors cancel
        if self.gamma.constant == 0.0:
            self.order = self.integrator.order
        elif symmetric or obelm:
            self.order = max(2, self.integrator.order)
        else:
            self.order = min(self.integrator.order, self.backward.order)

    @property
    def affine(self) -> bool:
        """Whether ``F`` is ``A x + B x0 + C eps`` with numbers of the times alone (both maps affine)."""
        return self.integrator.affine and self.backward.affine

    @property
    def identity(self) -> str:
        return f"BDIA({self.integrator!r}, gamma={self.gamma.identity}, backward={self.backward!r})"

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        return self.integrator.init(model, x, t, t_next, **kw)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        x = _pair(state, self).x
        F = self.drift(model, x, state.t_prev, state.t, t_next, **kw)
        return State(x, F.forward(state.x_prev), state.t, t_next)

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        x = _pair(state, self).x_prev
        self._check_invertible(model.schedule, t_prev, state.t_prev, state.t)
        F = self.drift(model, x, t_prev, state.t_prev, state.t, **kw)
        return State(F.inverse(state.x), x, t_prev, state.t_prev)

    def drift(self, model: Denoiser, x: torch.Tensor, t_prev: float, t: float, t_next: float, **kw: Any) -> _Drift:
        """gamma and ``F(x)`` at the shared point ``x`` (one model evaluation at ``t``)."""
        g = self.gamma.at(model.schedule, t_prev, t, t_next, x)
        pred = model(x, t, **kw)
        if self.affine:
            A, B, C = self.coefficients(model.schedule, t_prev, t, t_next, g)
            return _Drift(g, *pred.factored(A, x, B, C))
        ahead = self.integrator(model, x, t, t_next, pred, **kw)
        back = self.backward(model, x, t, t_prev, pred, **kw)
        return _Drift(g, *factored((1.0, ahead), (-g, back)))

    def coefficients(self, schedule: Schedule, t_prev: float, t: float, t_next: float, g: Coef) -> tuple:
        """``(A, B, C)`` with ``F = A x + B x0 + C eps`` (both maps affine): the forward map's minus gamma times the
        backward map's, in float64 (tensors for a per-sample gamma)."""
        f = self.integrator.coefficients(schedule, t, t_next)
        b = self.backward.coefficients(schedule, t, t_prev)
        return f[0] - g * b[0], f[1] - g * b[1], f[2] - g * b[2]

    def plan(self, model: Denoiser, walk: list[float], forward: bool, like: torch.Tensor) -> _Plan | Stepping:
        """The walk over ``walk`` (walk order) prepared once: each step's gamma and ``F``'s coefficients, folded
        into a ``Model``'s parametrisation where the model offers ``prepare``. The same bits as ``step`` and
        ``unstep``: the same numbers, applied by the same kernel. Over a multi-stage integrator (Heun), whose F is
        no fixed combination, the plan is its own steps."""
        if not self.affine or any(getattr(type(self), m) is not getattr(BDIA, m) for m in _DEFINITION):
            return Stepping(self, model, walk, forward)  # (a subclass that redefines a step walks by its own)
        return _Plan(self, model, walk, forward, like)

    @property
    def cacheable(self) -> bool:
        """Whether a plan stays valid for the next walk: gamma is a value, not a user function."""
        return self.gamma.pure

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """``linear_growth`` of this walk (``times`` in sampling order): how much it can grow one rounding error, an
        estimate. Refuses an inversion through a step with gamma = 0."""
        if not forward:
            for t_prev, t, t_next in zip(times, times[1:], times[2:], strict=False):
                self._check_invertible(schedule, t_prev, t, t_next)
        return linear_growth(self, schedule, times, forward, batch=self.gamma.batch or 1)

    def _check_invertible(self, schedule: Schedule, t_prev: float, t: float, t_next: float) -> None:
        if self.gamma.bounds(schedule, t_prev, t, t_next)[0] == 0:
            raise ValueError(
                f"BDIA with gamma = 0 (at the step t = {t} -> {t_next}) is the plain integrator and cannot be "
                "inverted; use gamma > 0"
            )

    def __repr__(self) -> str:
        return f"BDIA({self.integrator!r}, gamma={self.gamma!r}, backward={self.backward!r})"


_DEFINITION = ("init", "step", "unstep", "drift", "coefficients")  # what BDIA's plan computes in advance


class _Plan:
    """One BDIA walk prepared: for step ``j`` (from ``walk[j - 1]`` to ``walk[j]``, ``j >= 2``) its gamma, the
    evaluation time and F's coefficients; on a ``Model`` (``prepare``) the network's time tensor and the
    coefficients on ``(x, network output)``, with the way ``bdia._linalg.factored2`` splits them, so that a gamma = 1
    step is the network call and two ``torch.add``. The first step from a lone latent (``init``) likewise. Immutable:
    one plan serves many walks and threads."""

    __slots__ = ("amplification", "bare", "bare_from", "first", "forward", "identity", "solver", "steps", "walk")

    def __init__(self, solver: BDIA, model: Denoiser, walk: list[float], forward: bool, like: torch.Tensor):
        schedule = model.schedule
        prepare = getattr(model, "prepare", None) if getattr(model, "plannable", False) else None
        steps: list[tuple | None] = [None, None]
        # the steps that are the network call and two adds (a Model's output, gamma = 1): (ready, r, out_leads, s),
        # T = out + r front (or front + r out), then behind + s T, s signed for the walk's direction
        bare: list[tuple | None] = [None, None]
        for j in range(2, len(walk)):
            t_prev, t, t_next = (walk[j - 2], walk[j - 1], walk[j]) if forward else (walk[j], walk[j - 1], walk[j - 2])
            g = solver.gamma.at(schedule, t_prev, t, t_next, like)
            A, B, C = solver.coefficients(schedule, t_prev, t, t_next, g)
            ready = None if prepare is None else prepare(t, like)
            lead = None
            if ready is not None and type(g) is float and g == 1.0:
                # the numbers Prediction.factored computes for a Model's prediction (x, output, matrix)
                cu, cv = fold(B, C, ready.m)
                lead = _split(A + cu, cv, like.dtype)
            steps.append((g, t, ready, A, B, C))
            bare.append(None if lead is None else (ready, lead[1], lead[2], lead[0] if forward else -lead[0]))
        # a lone latent's first step, the integrator's, on a Model's output where it is its coefficients applied to
        # the prediction at its start (not at clean data, where the model is asked for the noise elsewhere)
        self.first = None
        integrator, t0, t1 = solver.integrator, walk[0], walk[1]
        if prepare is not None and type(integrator).__call__ is Integrator.__call__ and schedule.at(t0).sigma > 0:
            ready = prepare(t0, like)
            A, B, C = integrator.coefficients(schedule, t0, t1)
            cu, cv = fold(B, C, ready.m)
            self.first = (ready, _split(A + cu, cv, like.dtype))
        self.solver, self.walk, self.forward, self.steps, self.bare = solver, walk, forward, steps, bare
        self.bare_from = next(j for j in range(len(walk), 1, -1) if bare[j - 1] is None)  # (from here on, all are)
        self.identity = solver.identity
        times = walk if forward else walk[::-1]
        self.amplification = solver.amplification(schedule, times, forward)

    def init(self, model: Denoiser, x: torch.Tensor, kw: dict[str, Any]) -> State:
        output = getattr(model, "output", None)
        if self.first is None or self.first[1] is None or output is None or x.requires_grad:
            return self.solver.init(model, x, self.walk[0], self.walk[1], **kw)
        ready, (s, r, out_leads) = self.first
        out = output(x, ready, kw)
        T = torch.add(out, x, alpha=r) if out_leads else torch.add(x, out, alpha=r)
        return State(x, T if s == 1.0 else T.mul_(s), self.walk[0], self.walk[1])

    def step(self, model: Denoiser, state: State, j: int, kw: dict[str, Any], into: tuple | None = None) -> State:
        entry = self.steps[j]
        if entry is None:  # (the first step: a lone latent's was init; a given pair's continues here)
            move = self.solver.step if self.forward else self.solver.unstep
            return move(model, state, self.walk[j], **kw)
        g, t, ready, a, b, c = entry
        forward = self.forward
        x = _pair(state, self.solver).x if forward else state.x_prev
        if ready is None:
            F = _Drift(g, *model(x, t, **kw).factored(a, x, b, c))
        else:
            output = getattr(model, "output", None)  # (None where a Model subclass processes its prediction)
            unit = self.bare[j]
            if unit is not None and output is not None and not x.requires_grad:
                _, r, out_leads, s = unit
                new = _unit(state.x_prev if forward else state.x, x, output(x, ready, kw), r, out_leads, s, into)
                return State(x, new, t, self.walk[j]) if forward else State(new, x, self.walk[j], t)
            F = _Drift(g, *model.predict(x, ready, **kw).factored(a, x, b, c))
        dead = None if into is None else into[1]
        if forward:
            return State(x, F.forward(state.x_prev, dead), t, self.walk[j])
        return State(F.inverse(state.x, dead), x, self.walk[j], t)

    def run(self, model: Denoiser, box: list, start: int, kw: dict[str, Any], reuse: bool, owned: tuple) -> State:
        """Steps ``start`` to the end with nothing to watch between them, from the state in ``box`` (taken out, so
        that the walk's first latents are dropped as the walk moves on). Once the steps left are all gamma = 1 steps
        on a Model without a graph, the loop is the network call and two ``torch.add`` on the latents alone (no state
        per step); until then each step is ``step``. ``reuse``: write into the latents the walk owns and drops
        (``owned``: whether it owns the state's two latents), through one scratch tensor. The same bits as ``step``
        after ``step``."""
        output = getattr(model, "output", None)
        forward, walk, n = self.forward, self.walk, len(self.walk) - 1
        state = box.pop()
        x_prev, x, t_prev, t = _pair(state, self.solver).x_prev, state.x, state.t_prev, state.t
        del state
        # (out= is refused on tensors that autograd records: a walk with a graph steps one by one)
        bare = output is not None and not torch.is_grad_enabled()
        owned_prev, owned_x = owned
        scratch = torch.empty_like(x) if reuse else None
        j = start
        while j <= n and not (bare and j >= self.bare_from and (not reuse or (owned_prev and owned_x))):
            into = (scratch, x_prev if forward else x) if reuse and (owned_prev if forward else owned_x) else None
            stepped = self.step(model, State(x_prev, x, t_prev, t), j, kw, into)
            x_prev, x, t_prev, t = stepped.x_prev, stepped.x, stepped.t_prev, stepped.t
            del stepped  # (held over the next network call, its latents would outlive the pair)
            owned_prev, owned_x = (owned_x, True) if forward else (True, owned_prev)
            j += 1
        if j > n:
            return State(x_prev, x, t_prev, t)
        # the rest is _unit written out (a call per step is a tenth of a small latent's step), with reuse T going to
        # the scratch tensor and the new front over the point left behind
        behind, front = (x_prev, x) if forward else (x, x_prev)
        del x_prev, x
        for ready, r, out_leads, s in self.bare[j:]:
            out = output(front, ready, kw)
            T = (
                torch.add(out, front, alpha=r, out=scratch)
                if out_leads
                else torch.add(front, out, alpha=r, out=scratch)
            )
            del out  # (not held over the next network call)
            behind, front = front, torch.add(behind, T, alpha=s, out=behind if reuse else T)
        if forward:
            return State(behind, front, walk[n - 1], walk[n])
        return State(front, behind, walk[n], walk[n - 1])


def _unit(
    behind: torch.Tensor,
    front: torch.Tensor,
    out: torch.Tensor,
    r: float,
    out_leads: bool,
    s: float,
    into: tuple | None,
) -> torch.Tensor:
    """A gamma = 1 step on a Model's output, in walk order: ``T = out + r front`` (``out_leads``; else
    ``front + r out``), then the new front ``behind + s T`` (``s`` signed for the walk's direction: sampling's
    ``x_next = x_prev + s T``, inverting's ``x_prev = x_next - s T``); two ``torch.add``. ``into``: ``(scratch,
    dead)``, where ``T`` and the result may go."""
    scratch, dead = (None, None) if into is None else into
    T = torch.add(out, front, alpha=r, out=scratch) if out_leads else torch.add(front, out, alpha=r, out=scratch)
    return torch.add(behind, T, alpha=s, out=T if dead is None else dead)


def _split(a: float, b: float, dtype: torch.dtype) -> tuple[float, float, bool] | None:
    """How ``bdia._linalg.factored2`` writes ``a x + b out`` as ``s T``: ``(s, r, out_leads)`` with ``T = out + r x``
    (``out_leads``) or ``x + r out``; ``None`` where it does not factor (half precision, a zero or NaN)."""
    if dtype in (torch.float16, torch.bfloat16) or a != a or b != b:
        return None
    if abs(b) > abs(a):
        return b, a / b, True
    if a != 0:
        return a, b / a, False
    return None


def _check_integrator(v: object, name: str) -> None:
    if isinstance(v, type) and issubclass(v, Integrator):
        raise TypeError(f"{name} must be an instance, e.g. {v.__name__}(), got the class {v.__name__}")
    if not isinstance(v, Integrator):
        raise TypeError(f"{name} must be a bdia.solvers.Integrator (DDIM(), Euler(), Heun()), got {type(v).__name__}")


class _UnitGaussian:
    """The exact denoiser of standard normal data: ``x0 = alpha x / (alpha^2 + sigma^2)``, ``eps = sigma x / (...)``:
    linear in ``x``, so a solver's step on it is a linear map whose matrix its action on two basis latents gives."""

    def __init__(self, schedule: Schedule):
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        k = self.schedule.at(t)
        n = k.alpha * k.alpha + k.sigma * k.sigma
        return Prediction(x * (k.alpha / n), x * (k.sigma / n))


def linear_growth(solver: Any, schedule: Schedule, times: list[float], forward: bool, *, batch: int = 1) -> float:
    """How much a walk of ``solver`` over ``times`` (sampling order) can grow one rounding error: the largest
    ``w_k ||P_k||`` over its steps, ``P_k`` the product of the two-step updates' matrices after step ``k`` and
    ``w_k`` the scale of the latent step ``k`` rounds relative to the result's (``sqrt(alpha^2 + sigma^2)``, so that
    a walk whose latents merely grow with the noise level, as EDM's do, amplifies nothing).

    The matrices are those of the solver's own ``step`` (``unstep`` to invert) on unit-variance Gaussian data,
    whose denoiser is linear (probed on two basis latents, in float64). The estimate sees the solver, gamma and the
    grid, not the network's own growth (a trained or random network can add orders of magnitude): an estimate, not
    a bound (docs/theory.md, "Rounding"). 1 means no growth. ``batch``: the size a per-sample gamma needs (the
    largest growth over the samples is returned).
    """
    if len(times) < 3:
        return 1.0
    model = _UnitGaussian(schedule)
    e0 = torch.zeros(batch, 2, dtype=torch.float64)
    e1 = e0.clone()
    e0[:, 0], e1[:, 1] = 1.0, 1.0  # element 0 probes the older latent, element 1 the newer
    coupled = solver.init(model, e0, times[0], times[1]).coupled
    # each two-step update as (state before it, where it goes, the time of the latent it makes), in walk order
    if coupled:  # coupled copies step between consecutive times
        spans = list(itertools.pairwise(times))
        steps = (
            [(State(e0, e1, t, t, coupled=True), s, s) for t, s in spans]
            if forward
            else [(State(e0, e1, s, s, coupled=True), t, t) for t, s in reversed(spans)]
        )
    else:  # a pair steps over three consecutive times
        triples = list(zip(times, times[1:], times[2:], strict=False))
        steps = (
            [(State(e0, e1, p, t), n, n) for p, t, n in triples]
            if forward
            else [(State(e0, e1, t, n), p, p) for p, t, n in reversed(triples)]
        )
    move = solver.step if forward else solver.unstep
    matrices, scales = [], []
    for before, target, made in steps:
        after = move(model, before, target)
        # the matrix of (older, newer) -> (older, newer) after the step: rows from the images of the two probes
        older, newer = after.x_prev.tolist(), after.x.tolist()
        matrices.append([(o[0], o[1], n[0], n[1]) for o, n in zip(older, newer, strict=True)])
        scales.append(_scale(schedule, made))
    first = steps[0][0]
    start = _scale(schedule, first.t if forward or coupled else first.t_prev)
    end, worst = scales[-1], 1.0
    for b in range(batch):
        # the rounding of step i reaches the result through the later steps' matrices; the starting latents' through
        # all of them
        P = (1.0, 0.0, 0.0, 1.0)
        for i in range(len(matrices) - 1, 0, -1):
            P = _matmul(P, matrices[i][b])
            worst = max(worst, scales[i - 1] * _norm2(P) / end)
        worst = max(worst, start * _norm2(_matmul(P, matrices[0][b])) / end)
    return worst if math.isfinite(worst) else math.inf


def _scale(schedule: Schedule, t: float) -> float:
    """The typical size of a latent at ``t`` for unit-variance data."""
    k = schedule.at(t)
    return math.sqrt(k.alpha * k.alpha + k.sigma * k.sigma)


def _matmul(p: tuple, q: tuple) -> tuple:
    """2x2 matrices as (a, b, c, d) row-major, in python floats."""
    a, b, c, d = p
    e, f, g, h = q
    return a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h


def _norm2(p: tuple) -> float:
    """The spectral norm of a 2x2 matrix."""
    a, b, c, d = p
    s = a * a + b * b + c * c + d * d
    det = a * d - b * c
    return math.sqrt(max(0.0, (s + math.sqrt(max(0.0, s * s - 4 * det * det))) / 2))


class OBELM(BDIA):
    """O-BELM (Wang et al., NeurIPS 2024, "BELM"): the minimum-local-error bidirectional explicit linear
    multistep sampler, as BDIA over DDIM with the per-step ``gamma_i`` of ``obelm_gamma`` (docs/theory.md).
    Order 2, 1 NFE per step; the first step is a plain DDIM step.

    ``max_root``: ``None`` (the default) is the published formula. A number bounds the parasitic root
    ``a_i = (h_i / h_{i+1})^2`` of each step (``bdia.gamma.BoundedOBELM``): on grids whose steps in ``sbar`` grow
    towards the clean end (the last steps of any grid uniform in a discrete VP schedule's index) the published
    gamma_i reaches 3-5 and extrapolates the network's error. On the shipped digits model ``OBELM(max_root=1.0)`` is
    within 7% of the best of DDIM and BDIA (gamma 0.5, 1) in distance to a fine solution at every N from 10 to 400
    steps, where the published one is the least accurate one-evaluation solver from 50 steps up (10x DDIM's distance
    at 100 steps; docs/benchmarks.md, section 4). It changes only the steps whose root exceeds the bound.

    Its gamma_i can be far below 1 (0.004 on the last step of a 20-step SD grid), so on short grids its inversion
    amplifies rounding (``amplification``): exact in exact arithmetic, fragile in floating point.
    """

    def __init__(self, max_root: float | None = None) -> None:
        super().__init__(DDIM(), gamma=obelm_gamma if max_root is None else BoundedOBELM(max_root))
        self.max_root = max_root
        self.order = 2  # bounded: second order wherever the grid is smooth in sbar (there a_i = 1 + O(h) <= bound)

    def __repr__(self) -> str:
        return "OBELM()" if self.max_root is None else f"OBELM(max_root={self.max_root})"


@dataclasses.dataclass(frozen=True, eq=False)
class EDICTState(State):
    """Coupled copies with the parity of the walk: ``odd`` says whether the next step towards less noise is an odd
    one (counted from the noisy end of the grid walked, as the official EDICT code counts), which
    ``EDICT(alternate=True)`` needs to pick its update order. Each step flips it; a plain coupled ``State`` counts as
    even."""

    odd: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "odd": self.odd}

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> State:
        return EDICTState(
            d["x_prev"],
            d["x"],
            float(d["t_prev"]),
            float(d["t"]),
            bool(d["coupled"]),
            odd=bool(d["odd"]),
            **_provenance(d),
        )


class EDICT:
    """EDICT (Wallace, Gokul & Naik, CVPR 2023, eqs. 10-13): two coupled copies with mixing, exactly invertible.
    Order 1 (over DDIM), 2 NFE per step.

    From ``(x, y)`` at ``t`` to ``s``, with ``Phi_e(z)`` the integrator's step of ``z`` taking the noise
    prediction ``e`` as its eps (and ``x0 = (z - sigma_t e) / alpha_t``)::

        x' = Phi_{eps(y, t)}(x)        y' = Phi_{eps(x', t)}(y)       (the second call is at the START time t)
        x_s = p x' + (1 - p) y'        y_s = p y' + (1 - p) x_s

    and the inverse runs the four lines backwards (the same two model calls). With eps held, a
    single-evaluation integrator's step is affine in ``z``, ``Phi_e(z) = A z + B e``, which is what makes
    it invertible: ``integrator`` may be DDIM (the paper) or Euler, not a multi-stage one such as Heun.
    ``p`` in (0, 1]: the mixing weight (the paper's 0.93; 1 turns mixing off, which lets the copies drift).

    ``alternate``: ``False`` (the default) is the paper's equations at every step. ``True`` is what the authors'
    code runs by default (its ``leapfrog_steps``), and so what reproduces published EDICT edits: on odd steps
    (counted from the walk's noisy end) the copies are updated in the other order, ``y' = Phi_{eps(x, t)}(y)`` then
    ``x' = Phi_{eps(y', t)}(x)``, with the same mixing. The walk's parity rides in an ``EDICTState``; inverting data,
    the walk starts at the clean end with even parity, which is the code's when the number of steps inverted is even
    (its 50 steps, or 40 at its editing strength 0.8). After 50 SD steps the two variants' samples are 0.9-1.2% apart
    on the analytic mixtures.

    State: coupled copies at one time, ``EDICTState(x_prev=y, x=x, t_prev=t, t=t, coupled=True, odd=...)``; the
    output latent (the sample of ``bdia.sample``, the inverted noise of ``bdia.invert``) is ``state.x``. ``init`` sets
    ``x = y`` and takes no step.
    """

    nfe, order = 2, 1
    nonfinite_persists = True  # each copy's update includes the copy (bdia.sampling.FiniteCheck)

    def __init__(self, integrator: Integrator | None = None, p: float = 0.93, alternate: bool = False):
        self.integrator = DDIM() if integrator is None else integrator
        _check_integrator(self.integrator, "integrator")
        if not self.integrator.affine:
            raise ValueError(
                f"EDICT needs a single-evaluation integrator (DDIM or Euler), got {self.integrator!r} with "
                f"{self.integrator.nfe} evaluations per step: its step is not affine in the latent for a fixed eps"
            )
        if isinstance(p, bool) or not isinstance(p, int | float):
            raise TypeError(f"p must be a float in (0, 1], got {type(p).__name__}")
        p = float(p)
        if not (0.0 < p <= 1.0):
            raise ValueError(f"p must lie in (0, 1] (the mixing weight; the paper uses 0.93), got {p}")
        if not isinstance(alternate, bool):
            raise TypeError(f"alternate must be a bool (True: the official code's update order), got {alternate!r}")
        self.p, self.alternate = p, alternate

    @property
    def identity(self) -> str:
        return repr(self)

    cacheable = True  # its plan (the walk's parity) depends on its configuration alone

    def plan(self, model: Denoiser, walk: list[float], forward: bool, like: torch.Tensor) -> Stepping:
        """Its own steps, with the parity that the number of steps walked sets when inverting a lone latent."""
        return _EDICTPlan(self, model, walk, forward)

    def _affine(self, schedule: Schedule, t: float, s: float) -> tuple[float, float]:
        """``(A, B)`` with ``Phi_e(z; t -> s) = A z + B e`` for a noise prediction ``e``: the integrator's
        coefficients with ``x0 = (z - sigma_t e) / alpha_t`` substituted."""
        k = schedule.at(t)
        if k.alpha == 0:
            raise ValueError(
                f"EDICT steps from t = {t}, where alpha = 0 (pure noise): its update takes x0 from the noise "
                "prediction, which pure noise does not determine; start the grid below the schedule's end"
            )
        a, b, c = self.integrator.coefficients(schedule, t, s)
        return a + b / k.alpha, c - b * k.sigma / k.alpha

    def _swapped(self, state: State) -> bool:
        """Whether the step leaving ``state`` towards less noise updates ``y`` first."""
        return self.alternate and getattr(state, "odd", False)

    def init(self, model: Denoiser, x: torch.Tensor, t: float, t_next: float, **kw: Any) -> State:
        """Both copies start as ``x`` (the paper's ``x_T = y_T``); no step is taken."""
        return EDICTState(x, x, t, t, coupled=True) if self.alternate else State(x, x, t, t, coupled=True)

    def _state(self, y: torch.Tensor, x: torch.Tensor, t: float, odd: bool) -> State:
        return EDICTState(y, x, t, t, coupled=True, odd=odd) if self.alternate else State(y, x, t, t, coupled=True)

    def step(self, model: Denoiser, state: State, t_next: float, **kw: Any) -> State:
        y, x, t = state.x_prev, state.x, _coupled(state).t
        p = self.p
        swap = self._swapped(state)
        A, B = self._affine(model.schedule, t, t_next)
        first, second = (y, x) if swap else (x, y)  # the copy updated first, with the other's eps
        first_mid = lincomb((A, first), (B, model(second, t, **kw).eps))
        second_mid = lincomb((A, second), (B, model(first_mid, t, **kw).eps))
        x_mid, y_mid = (second_mid, first_mid) if swap else (first_mid, second_mid)
        x_new = lincomb((p, x_mid), (1.0 - p, y_mid))
        return self._state(lincomb((p, y_mid), (1.0 - p, x_new)), x_new, t_next, not getattr(state, "odd", False))

    def unstep(self, model: Denoiser, state: State, t_prev: float, **kw: Any) -> State:
        y_new, x_new, s = state.x_prev, state.x, _coupled(state).t
        odd = not getattr(state, "odd", False)  # the parity of the step being undone
        swap = self.alternate and odd
        inv = 1.0 / self.p
        y_mid = lincomb((inv, y_new), (-(1.0 - self.p) * inv, x_new))
        x_mid = lincomb((inv, x_new), (-(1.0 - self.p) * inv, y_mid))
        A, B = self._affine(model.schedule, t_prev, s)
        first_mid, second_mid = (y_mid, x_mid) if swap else (x_mid, y_mid)
        # the step updated `first` with eps(second) and then `second` with eps(first_mid): undo the second update first
        second = lincomb((1.0 / A, second_mid), (-B / A, model(first_mid, t_prev, **kw).eps))
        first = lincomb((1.0 / A, first_mid), (-B / A, model(second, t_prev, **kw).eps))
        x, y = (second, first) if swap else (first, second)
        return self._state(y, x, t_prev, odd)

    def amplification(self, schedule: Schedule, times: list[float], forward: bool) -> float:
        """``linear_growth`` of this walk: its inverse divides by ``p`` and by the integrator's ``A`` every step."""
        return linear_growth(self, schedule, times, forward)

    def __repr__(self) -> str:
        alt = ", alternate=True" if self.alternate else ""
        return f"EDICT({self.integrator!r}, p={self.p}{alt})"


class _EDICTPlan(Stepping):
    """EDICT's walk: its own steps; inverting a lone latent over n steps starts with the parity of step n."""

    def init(self, model: Denoiser, x: torch.Tensor, kw: dict[str, Any]) -> State:
        state = super().init(model, x, kw)
        if self.forward or not isinstance(state, EDICTState):
            return state
        return dataclasses.replace(state, odd=(len(self.walk) - 1) % 2 == 1)
