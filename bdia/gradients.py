"""Gradients through sampling at constant memory: walk back with ``unstep``, re-run one step under autograd.

The reversible adjoint (docs/exactness.md; the idea behind torchsde's reversible Heun and DOODL's
backpropagation through EDICT): the forward pass keeps only the final state; the backward pass rebuilds
each earlier state pair from the later one with the solver's exact inverse and takes the vector-Jacobian
product of that single step, so memory does not grow with the number of steps N. Cost: the forward
pass (N steps), then per step one model evaluation shared by the rebuild and the recomputed step (float
BDIA) or two (the exact mode, which rebuilds without autograd so that its integers see the same bits as
the forward pass), plus one backward pass through the model.

Exactness of the rebuilt states: BDIA with gamma = 1 rebuilds to rounding; ``bdia.exact.Exact`` rebuilds
to the bit (its gradient is that of its float surrogate, the rounding being treated as the identity);
for float BDIA with gamma < 1 the rebuild drifts like gamma^-N (docs/theory.md), so pass
``checkpoint_every=K``: the states at every K-th step are kept (memory N/K states, no graphs) and the
walk restarts from them, so drift grows over at most K steps. ``checkpoint_every=1`` is classic per-step
gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from bdia.exact import Exact
from bdia.models import Denoiser
from bdia.sampling import _begin, _FiniteCheck, _Walk, stamp
from bdia.solvers import BDIA
from bdia.state import State

__all__ = ["sample_with_grad"]


def sample_with_grad(
    model: Denoiser,
    x: torch.Tensor | State,
    ts: torch.Tensor,
    solver: Any,
    *,
    params: Sequence[torch.Tensor] | None = None,
    checkpoint_every: int | None = None,
    **model_kwargs: Any,
) -> State:
    """``bdia.sample`` whose result is differentiable at a memory cost independent of the number of steps.

    Gradients flow to the starting latent ``x`` (or both tensors of a starting ``State``, e.g. from
    ``bdia.invert``), to tensor ``model_kwargs`` that require grad (conditioning), and to ``params``
    (default: the parameters that require grad of every ``torch.nn.Module`` visible from ``model``: through
    ``Model``, ``CFG``, lambdas' and functions' closures, bound methods and partials; if none is visible this is an
    error, never a silent lack of weight gradients: pass ``params=[...]``, or ``params=()`` for the input alone).
    Refused before any work, like ``bdia.sample``: a bad grid or input, non-finite input, nothing to differentiate,
    and a gamma the backward pass cannot divide by; NaN produced in the forward pass raises naming the step.
    ``solver``: ``BDIA`` with gamma = 1, ``bdia.exact.Exact`` (any gamma), or any BDIA with
    ``checkpoint_every``. Returns a ``State`` (an ``ExactState`` in exact mode) whose ``x`` is the sample.
    """
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
    if not isinstance(solver, BDIA | Exact):
        raise TypeError(f"solver must be a bdia.solvers.BDIA or bdia.exact.Exact, got {type(solver).__name__}")
    taken = sorted(_WALK_KEYWORDS & set(model_kwargs))
    if taken:
        raise TypeError(
            f"sample_with_grad does not take {', '.join(k + '=' for k in taken)} (keywords of bdia.sample, not of the "
            "network): its walk has no callback, progress bar, strength or amplification limit, and every other "
            "keyword goes to the network (wrap the network to pass it a keyword of that name)"
        )
    args = _Walk(model, x, ts, solver, True, None, False, False, None, True, None, model_kwargs)
    plan, start, k = _begin(args, model, init=False)
    grid = plan.walk
    if isinstance(solver, BDIA) and checkpoint_every != 1:
        _check_rebuildable(
            solver, model.schedule, grid if start is None else [start.t_prev, *grid[k:]], checkpoint_every
        )
    params = _parameters(model) if params is None else list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad")
    names = [k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    starts = (x,) if start is None else (start.x_prev, start.x)
    if not (params or names or any(s.requires_grad for s in starts)):
        raise ValueError(
            "nothing to differentiate: x (or the state's latents) does not require grad, no conditioning tensor "
            "requires grad and params is empty; call x.requires_grad_() or pass params="
        )
    walk = _Differentiable(model, grid, solver, model_kwargs, names, len(params), start, k, checkpoint_every)
    out = _Reversible.apply(walk, *starts, *(model_kwargs[n] for n in names), *params)
    final = dataclasses.replace(walk.final, x_prev=out[0], x=out[1])  # an ExactState keeps its integers
    return stamp(final, grid, solver)


_WALK_KEYWORDS = frozenset({"strength", "grad", "progress", "callback", "check_finite", "max_amplification"})


def _check_rebuildable(solver: BDIA, schedule, times: list[float], every: int | None) -> None:
    """Float BDIA rebuilds each earlier state by dividing by gamma: refuse before any work where that cannot hold."""
    for i, (t_prev, t, t_next) in enumerate(zip(times, times[1:], times[2:], strict=False)):
        lo, hi = solver.gamma.bounds(schedule, t_prev, t, t_next)
        if every is None and not lo == hi == 1.0:
            raise ValueError(
                "float BDIA with gamma != 1 cannot rebuild its states backwards (errors grow like gamma^-N): "
                "wrap it in bdia.exact.Exact(...) or pass checkpoint_every=K"
            )
        if lo == 0 and i % every != 0:  # step i rebuilds state i unless it is a checkpoint
            raise ValueError(
                f"gamma = 0 at the step t = {t} -> {t_next} makes the state before it impossible to rebuild: "
                "pass checkpoint_every=1, or use gamma > 0"
            )


def _parameters(model: Any) -> list[torch.Tensor]:
    """The parameters that require grad of every ``torch.nn.Module`` visible from ``model``: through attributes
    that hold networks (``net``, ``model``, ``module``: ``Model``, ``CFG``, ``CountNFE``), closures of functions
    and lambdas, bound methods and ``functools.partial``. None visible is an error: gradients would be silently
    dropped."""
    found: dict[int, torch.nn.Module] = {}
    seen: set[int] = set()

    def visit(obj: Any, depth: int) -> None:
        if obj is None or id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            found[id(obj)] = obj
            return
        for name in ("net", "model", "module", "func", "__self__", "__wrapped__"):
            visit(getattr(obj, name, None), depth + 1)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                visit(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
        for arg in (*getattr(obj, "args", ()), *getattr(obj, "keywords", {}).values()) if callable(obj) else ():
            visit(arg, depth + 1)

    visit(model, 0)
    if not found:
        raise ValueError(
            f"found no torch.nn.Module inside {type(model).__name__} to take weight gradients from: pass params=[...] "
            "(the tensors to differentiate), or params=() for gradients of the input and conditioning alone"
        )
    unique = {id(p): p for m in found.values() for p in m.parameters() if p.requires_grad}
    return list(unique.values())


class _Differentiable:
    """Everything about one differentiable walk that is not a tensor input."""

    def __init__(self, model, grid, solver, kw, names, n_params, start, k, every):
        self.model, self.grid, self.solver, self.kw, self.names = model, grid, solver, kw, names
        self.n_params, self.start, self.k, self.every = n_params, start, k, every
        self.final: State | None = None
        self.anchors: dict[int, State] = {}

    def kwargs(self, cond: Sequence[torch.Tensor]) -> dict[str, Any]:
        return {**self.kw, **dict(zip(self.names, cond, strict=True))}


class _Reversible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, walk: _Differentiable, *inputs: torch.Tensor):
        n_start = 1 if walk.start is None else 2
        cond = inputs[n_start : n_start + len(walk.names)]
        walk.cond, walk.params = cond, list(inputs[n_start + len(walk.names) :])
        kw = walk.kwargs(cond)
        model, solver, grid = walk.model, walk.solver, walk.grid
        if walk.start is None:
            state, k = solver.init(model, inputs[0], grid[0], grid[1], **kw), 1
        else:
            state, k = walk.start, walk.k
        walk.times = [state.t_prev, *grid[k:]]  # times[i], times[i + 1]: the pair of the i-th state
        check = _FiniteCheck(grid, solver, state.x)
        check.record(k, state, True)
        if walk.every is not None:
            walk.anchors[0] = state
        for i, t in enumerate(grid[k + 1 :], start=1):
            state = solver.step(model, state, t, **kw)
            check.record(k + i, state, True)
            if walk.every is not None and i % walk.every == 0:
                walk.anchors[i] = state
        check.raise_if_bad(state)
        walk.final, walk.n_steps = state, len(grid) - 1 - k
        ctx.walk = walk
        outs = [state.x_prev, state.x]
        return tuple(o.clone() if any(o is i for i in inputs) else o for o in outs)

    @staticmethod
    def backward(ctx, g_prev: torch.Tensor | None, g_x: torch.Tensor | None):
        walk: _Differentiable = ctx.walk
        model, solver, times = walk.model, walk.solver, walk.times
        diff = solver.surrogate if isinstance(solver, Exact) else solver
        state = walk.final
        a_bar = torch.zeros_like(state.x_prev) if g_prev is None else g_prev  # adjoint of state.x_prev
        c_bar = torch.zeros_like(state.x) if g_x is None else g_x  # adjoint of state.x
        leaves = [c.detach().requires_grad_() for c in walk.cond]
        kw_live, kw_plain = walk.kwargs(leaves), walk.kwargs([c.detach() for c in walk.cond])
        wrt = [*leaves, *walk.params]
        sums: list[torch.Tensor | None] = [None] * len(wrt)

        def accumulate(grads: Sequence[torch.Tensor | None]) -> None:
            for j, g in enumerate(grads):
                if g is not None:
                    sums[j] = g if sums[j] is None else sums[j] + g

        for i in range(walk.n_steps - 1, -1, -1):  # the step from state i to state i + 1
            t_prev, t, t_next = times[i], times[i + 1], times[i + 2]
            before = walk.anchors.get(i)
            if before is None and isinstance(solver, Exact):
                # rebuilt without autograd, so that the integers see exactly the forward pass's bits
                with torch.no_grad():
                    before = solver.unstep(model, state, t_prev, **kw_plain)
            b = state.x_prev.detach().requires_grad_()
            with torch.enable_grad():
                F = diff.drift(model, b, t_prev, t, t_next, **kw_live)
                grads = torch.autograd.grad(F.tensor(), [b, *wrt], c_bar, allow_unused=True)
            g = F.gamma
            if before is None:  # float BDIA: the rebuild shares the evaluation with the recomputed step (unstep's bits)
                with torch.no_grad():
                    before = State(F._replace(T=F.T.detach()).inverse(state.x), state.x_prev, t_prev, t)
            new_a_bar = c_bar * (g.to(c_bar.dtype) if isinstance(g, torch.Tensor) else g)  # d x_next / d x_prev
            c_bar = a_bar if grads[0] is None else a_bar + grads[0]
            a_bar, state = new_a_bar, before
            accumulate(grads[1:])
        if walk.start is None:  # the first step is the plain integrator from the lone latent
            x = state.x_prev.detach().requires_grad_()
            with torch.enable_grad():
                out = diff.integrator(model, x, times[0], times[1], **kw_live)
                grads = torch.autograd.grad(out, [x, *wrt], c_bar, allow_unused=True)
            accumulate(grads[1:])
            starts: tuple = (a_bar if grads[0] is None else a_bar + grads[0],)
        else:
            starts = (a_bar, c_bar)
        return (None, *starts, *sums)
