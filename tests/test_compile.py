"""``torch.compile``: a compiled network runs through ``bdia.sample`` / ``bdia.invert`` without recompiling per step
(the time reaches the network as a ``(batch,)`` tensor, never as a python number that dynamo would guard on)."""

from __future__ import annotations

import pytest
import torch

import bdia
from bdia.models import CFG, Model
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.conv(x)) * (1 + t[:, None, None, None] / 1000)
        return h if cond is None else h + cond[:, :, None, None]


@pytest.mark.parametrize("solver", [BDIA(DDIM()), EDICT()], ids=["bdia", "edict"])
def test_a_compiled_network_is_compiled_once_for_a_whole_walk(solver):
    torch.manual_seed(0)
    net = _Net().eval().requires_grad_(False)
    sd = DiscreteVP.stable_diffusion()
    x = torch.randn(2, 4, 8, 8)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="eager")  # dynamo's tracing and guards, without code generation
    model = Model(compiled, sd, "epsilon")
    out = bdia.sample(model, x, sd.timesteps(10, "leading", steps_offset=1), solver)
    bdia.invert(model, out, sd.timesteps(10, "leading", steps_offset=1), solver)
    bdia.sample(model, x, sd.timesteps(7, "trailing"), solver)  # other times: still the same graph
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    ref = bdia.sample(Model(net, sd, "epsilon"), x, sd.timesteps(10, "leading", steps_offset=1), solver)
    assert torch.equal(out.x, ref.x)


def test_a_compiled_network_under_guidance_is_compiled_once():
    torch.manual_seed(0)
    net = _Net().eval().requires_grad_(False)
    sd = DiscreteVP.stable_diffusion()
    dynamo.reset()
    counters.clear()
    model = Model(CFG(torch.compile(net, backend="eager"), 3.0, cond=torch.zeros(1, 4)), sd, "epsilon")
    bdia.sample(
        model, torch.randn(2, 4, 8, 8), sd.timesteps(10, "leading", steps_offset=1), BDIA(), cond=torch.ones(2, 4)
    )
    assert counters["stats"]["unique_graphs"] == 1 and sum(counters["recompiles"].values()) == 0
