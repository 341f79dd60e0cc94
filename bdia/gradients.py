"""Gradients through sampling at constant memory: walk back with ``unstep``, re-run one step under autograd.

The reversible adjoint (NOTES section 5; the idea behind torchsde's reversible Heun and DOODL's
backpropagation through EDICT): the forward pass keeps only the final state; the backward pass rebuilds
each earlier state pair from the later one with the solver's exact inverse and takes the vector-Jacobian
product of that single step, so memory does not grow with the number of steps N. Cost: the forward
pass (N steps), then per step one model evaluation shared by the rebuild and the recomputed step (float
BDIA) or two (the exact mode, which rebuilds without autograd so that its integers see the same bits as
the forward pass), plus one backward pass through the model.

Exactness of the rebuilt states: BDIA with gamma = 1 rebuilds to rounding; ``bdia.exact.Exact`` rebuilds
to the bit (its gradient is that of its float surrogate, the rounding being treated as the identity);
for float BDIA with gamma < 1 the rebuild drifts like gamma^-N (NOTES section 4), so pass
``checkpoint_every=K``: the states at every K-th step are kept (memory N/K states, no graphs) and the
walk restarts from them, so drift grows over at most K steps. ``checkpoint_every=1`` is classic per-step
gradient checkpointing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from bdia.exact import Exact, ExactState
from bdia.linalg import lincomb
from bdia.models import Denoiser
from bdia.sampling import _begin
from bdia.schedules import check_grid
from bdia.solvers import BDIA
from bdia.state import State, check_latent

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
    (default: the parameters that require grad of ``model`` or ``model.net`` when it is a ``torch.nn.Module``).
    ``solver``: ``BDIA`` with gamma = 1, ``bdia.exact.Exact`` (any gamma), or any BDIA with
    ``checkpoint_every``. Returns a ``State`` (an ``ExactState`` in exact mode) whose ``x`` is the sample.
    """
    grid = check_grid(ts, getattr(model, "schedule", None))
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive int or None, got {checkpoint_every!r}")
    if not isinstance(solver, BDIA | Exact):
        raise TypeError(f"solver must be a bdia.solvers.BDIA or bdia.exact.Exact, got {type(solver).__name__}")
    if checkpoint_every is None and isinstance(solver, BDIA) and not _unit_gamma(solver):
        raise ValueError(
            "float BDIA with gamma != 1 cannot rebuild its states backwards (errors grow like gamma^-N): "
            "wrap it in bdia.exact.Exact(...) or pass checkpoint_every=K"
        )
    if params is None:
        params = _parameters(model)
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"params[{i}] must be a tensor that requires grad")
    names = [k for k, v in model_kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if isinstance(x, State):
        start, k = _begin(model, x, grid, solver, True, {})
        starts = (start.x_prev, start.x)
    else:
        x = check_latent(x)
        start, k, starts = None, 0, (x,)
    walk = _Walk(model, grid, solver, model_kwargs, names, len(params), start, k, checkpoint_every)
    out = _Reversible.apply(walk, *starts, *(model_kwargs[n] for n in names), *params)
    f = walk.final
    if isinstance(f, ExactState):
        return ExactState(out[0], out[1], f.t_prev, f.t, fixed=f.fixed)
    return State(out[0], out[1], f.t_prev, f.t, f.coupled)


def _unit_gamma(solver: BDIA) -> bool:
    return isinstance(solver.gamma, float) and solver.gamma == 1.0


def _parameters(model: Any) -> list[torch.Tensor]:
    for obj in (model, getattr(model, "net", None)):
        if isinstance(obj, torch.nn.Module):
            return [p for p in obj.parameters() if p.requires_grad]
    return []


class _Walk:
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
    def forward(ctx, walk: _Walk, *inputs: torch.Tensor):
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
        if walk.every is not None:
            walk.anchors[0] = state
        for i, t in enumerate(grid[k + 1 :], start=1):
            state = solver.step(model, state, t, **kw)
            if walk.every is not None and i % walk.every == 0:
                walk.anchors[i] = state
        walk.final, walk.n_steps = state, len(grid) - 1 - k
        ctx.walk = walk
        outs = [state.x_prev, state.x]
        return tuple(o.clone() if any(o is i for i in inputs) else o for o in outs)

    @staticmethod
    def backward(ctx, g_prev: torch.Tensor | None, g_x: torch.Tensor | None):
        walk: _Walk = ctx.walk
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
                g, drift = diff.drift(model, b, t_prev, t, t_next, **kw_live)
                grads = torch.autograd.grad(drift, [b, *wrt], c_bar, allow_unused=True)
            if before is None:  # float BDIA: the rebuild shares the evaluation with the recomputed step
                with torch.no_grad():
                    inv = 1.0 / g
                    before = State(lincomb((inv, state.x), (-inv, drift.detach())), state.x_prev, t_prev, t)
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
