"""Gradients through sampling at constant memory: equal to plain autograd, gradcheck, errors."""

from __future__ import annotations

import pytest
import torch

import bdia
from bdia.exact import Exact, ExactState
from bdia.gradients import sample_with_grad
from bdia.models import Model
from bdia.solvers import BDIA, DDIM, Euler, Heun, obelm_gamma
from bdia.state import State
from tests.conftest import grid, schedule

# float64 throughout: the reversible walk rebuilds states to rounding, so its gradients differ from
# plain autograd's by a few eps times the walk's conditioning; 1e-8 leaves seven orders of margin,
# and is far above the exact mode's quantisation (2^-50 per step at float64's default resolution).
TOL = 1e-8


class Net(torch.nn.Module):
    """A small time- and condition-dependent network (epsilon prediction)."""

    def __init__(self, dim: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(dim + 1, hidden, generator=g, dtype=torch.float64) / 2)
        self.w2 = torch.nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=torch.float64) / 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.cat([x, t[:, None] / 1000], 1) @ self.w1
        out = torch.tanh(h) @ self.w2
        return out if cond is None else out + 0.3 * torch.tanh(cond)


def setup(kind: str = "sd", n: int = 12, variant: int = 1, seed: int = 0):
    net = Net(seed=seed)
    model = Model(net, schedule(kind), "velocity" if kind == "flow" else "epsilon")
    ts = grid(kind, n, variant=variant)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return net, model, ts, x, cond, target


def gradients(run, leaves):
    for v in leaves:
        v.grad = None
    out = run()
    loss = ((out.x - run.target) ** 2).sum() + 0.1 * out.x_prev.square().sum()
    loss.backward()
    return [v.grad.clone() for v in leaves]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((u - v).norm() / v.norm()) for u, v in zip(a, b, strict=True))


def compare(model, x, ts, solver, reference, leaves, target, checkpoint_every=None, **kw):
    def ours():
        return sample_with_grad(model, x, ts, solver, checkpoint_every=checkpoint_every, **kw)

    def plain():
        return bdia.sample(model, x, ts, reference, grad=True, **kw)

    ours.target = plain.target = target
    return rel(gradients(ours, leaves), gradients(plain, leaves))


@pytest.mark.parametrize("integrator", [DDIM(), Euler(), Heun()], ids=repr)
@pytest.mark.parametrize("kind", ["sd", "edm", "flow"])
def test_gamma_one_equals_plain_autograd(integrator, kind):
    net, model, ts, x, cond, target = setup(kind)
    if kind == "edm":
        x = (x.detach() * 80).requires_grad_()
    solver = BDIA(integrator, 1.0)
    assert compare(model, x, ts, solver, solver, [x, cond, *net.parameters()], target, cond=cond) < TOL


@pytest.mark.parametrize("gamma", [0.94, 0.5, 0.1, obelm_gamma], ids=str)
def test_exact_mode_equals_plain_autograd_through_its_float_surrogate(gamma):
    kind, variant = ("edm", 2) if gamma is obelm_gamma else ("sd", 1)
    net, model, ts, x, cond, target = setup(kind, n=15, variant=variant)
    ex = Exact(BDIA(DDIM(), gamma))
    assert compare(model, x, ts, ex, ex.surrogate, [x, cond, *net.parameters()], target, cond=cond) < TOL


@pytest.mark.parametrize("every", [1, 3, 5])
def test_checkpoints_make_float_gamma_below_one_exact(every):
    net, model, ts, x, cond, target = setup(n=14)
    solver = BDIA(DDIM(), 0.3)
    leaves = [x, cond, *net.parameters()]
    assert compare(model, x, ts, solver, solver, leaves, target, cond=cond, checkpoint_every=every) < TOL


def test_gradients_reach_an_inverted_state_pair():
    net, model, ts, x, cond, target = setup(n=10)
    solver = BDIA(DDIM(), 1.0)
    with torch.no_grad():
        z = bdia.invert(model, x.detach(), ts, solver, cond=cond)
    a, b = z.x_prev.clone().requires_grad_(), z.x.clone().requires_grad_()
    start = State(a, b, z.t_prev, z.t)
    assert compare(model, start, ts, solver, solver, [a, b, cond, *net.parameters()], target, cond=cond) < TOL


def test_exact_state_start_and_result_type():
    net, model, ts, x, _, target = setup(n=10)
    ex = Exact(BDIA(DDIM(), 0.5))
    with torch.no_grad():
        z = bdia.invert(model, x.detach(), ts, ex)
    a, b = z.x_prev.clone().requires_grad_(), z.x.clone().requires_grad_()
    start = ExactState(a, b, z.t_prev, z.t, fixed=z.fixed)
    out = sample_with_grad(model, start, ts, ex)
    assert isinstance(out, ExactState)
    # the exact result itself is the exact mode's sample, bit for bit
    with torch.no_grad():
        assert torch.equal(out.x, bdia.sample(model, z, ts, ex).x)
    assert compare(model, start, ts, ex, ex.surrogate, [a, b, *net.parameters()], target) < TOL


def test_gradcheck_on_a_small_case():
    _, model, ts, x, cond, _ = setup(n=5)
    solver = BDIA(DDIM(), 1.0)

    def f(x, cond):
        out = sample_with_grad(model, x, ts, solver, params=[], cond=cond)
        return out.x, out.x_prev

    assert torch.autograd.gradcheck(f, (x, cond), eps=1e-6, atol=1e-7)


def test_gradcheck_exact_mode():
    _, model, ts, x, _, _ = setup(n=5)
    ex = Exact(BDIA(DDIM(), 0.5), frac_bits=50)

    # the exact map is piecewise constant at the scale 2^-50; gradcheck's eps = 1e-6 sees its float surrogate
    def f(x):
        return sample_with_grad(model, x, ts, ex, params=[]).x

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_forward_keeps_no_graph():
    """The forward pass saves no tensor for autograd whatever N (plain autograd saves O(N))."""
    _, model, _, x, cond, _ = setup()

    def saved(run) -> int:
        count = 0

        def pack(t):
            nonlocal count
            count += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return count

    for n in (5, 20):
        ts = grid("sd", n, variant=1)
        assert saved(lambda ts=ts: sample_with_grad(model, x, ts, BDIA(), cond=cond)) == 0
    plain = [
        saved(lambda n=n: bdia.sample(model, x, grid("sd", n, variant=1), BDIA(), cond=cond, grad=True))
        for n in (5, 20)
    ]
    assert plain[1] > 3 * plain[0] > 0  # the baseline does grow, so the check above can fail


def test_parameters_are_found_on_the_model_or_its_net():
    net, model, ts, x, _, target = setup(n=6)
    out = sample_with_grad(model, x, ts, BDIA())
    ((out.x - target) ** 2).sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())


def test_bad_arguments_are_named():
    _, model, ts, x, _, _ = setup(n=6)
    with pytest.raises(ValueError, match="gamma\\^-N.*Exact.*checkpoint_every"):
        sample_with_grad(model, x, ts, BDIA(DDIM(), 0.5))
    with pytest.raises(ValueError, match="gamma\\^-N"):
        sample_with_grad(model, x, ts, BDIA(DDIM(), obelm_gamma))
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        sample_with_grad(model, x, ts, BDIA(), checkpoint_every=0)
    with pytest.raises(TypeError, match="solver must be a bdia.solvers.BDIA or bdia.exact.Exact"):
        sample_with_grad(model, x, ts, DDIM())
    with pytest.raises(ValueError, match="params\\[0\\] must be a tensor that requires grad"):
        sample_with_grad(model, x, ts, BDIA(), params=[torch.zeros(3)])
    with pytest.raises(TypeError, match="torch.Tensor or a bdia.State"):
        sample_with_grad(model, [1.0], ts, BDIA())


def test_benchmark_quick_mode_runs(tmp_path):
    from benchmarks.gradients import run

    payload = run(quick=True, results_dir=tmp_path, img_dir=tmp_path)
    assert (tmp_path / "gradients_quick.json").exists() and (tmp_path / "gradients_memory_quick.png").exists()
    methods = {r["method"] for r in payload["rows"]}
    assert {"plain autograd", "checkpoint per step", "reversible (gamma=1)"} <= methods
    # float32 gradients of every method agree with plain autograd through the same float map
    assert all(r["grad vs plain autograd (rel)"] < 1e-4 for r in payload["rows"])
