"""The README's code examples run as written (with small stand-ins for the user's own networks and data)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import bdia
from bdia.models import GaussianMixture
from bdia.schedules import EDM, DiscreteVP, Flow

README = Path(__file__).resolve().parents[1] / "README.md"


def _stand_ins() -> dict:
    g = torch.Generator().manual_seed(0)
    sd = GaussianMixture.random(DiscreteVP.stable_diffusion(), dim=8, components=3, std=0.5)
    edm = GaussianMixture.random(EDM(), dim=8, components=3, std=0.5)
    flow = GaussianMixture.random(Flow(), dim=8, components=3, std=0.5)

    class MyUNet(torch.nn.Module):
        """An epsilon network whose answer depends (a little) on its conditioning and on one weight."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.01, dtype=torch.float64))

        def forward(self, x, t, encoder_hidden_states):
            return sd(x, float(t[0])).eps + self.w * encoder_hidden_states.mean(-1, keepdim=True)

    my_unet = MyUNet()

    def denoiser(x, t):  # EDM: predicts x0
        return edm(x, float(t[0])).x0

    def karras_model(x, sigma, cond):  # k-diffusion's convention: sigma of shape (batch,), returns x0
        return edm(x, float(sigma[0])).x0 + 0.01 * cond.mean(-1, keepdim=True)

    def velocity_net(x, t):  # rectified flow: predicts eps - x0
        p = flow(x, float(t[0]))
        return p.eps - p.x0

    from tests.test_diffusers_pipeline import readme_stand_ins  # the "With diffusers" section's tiny pipeline

    return {
        **readme_stand_ins(),
        "my_unet": my_unet,
        "denoiser": denoiser,
        "velocity_net": velocity_net,
        "karras_model": karras_model,
        "print_step": lambda d: None,  # a k-diffusion callback
        "noise": torch.randn(2, 8, generator=g, dtype=torch.float64),
        "c": torch.randn(2, 4, dtype=torch.float64, generator=g),
        "src": torch.randn(2, 4, dtype=torch.float64, generator=g),
        "tgt": torch.randn(2, 4, dtype=torch.float64, generator=g),
        "null_emb": torch.zeros(1, 4, dtype=torch.float64),
        "real_latent": sd.sample(2, generator=g),
        "loss": lambda x: x.pow(2).sum(),
    }


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples write files (a saved state)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = _stand_ins()
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # and what their comments promise
    ns = namespace
    k = ns["back"].fixed.frac_bits
    assert torch.equal(ns["back"].fixed.X, torch.round(ns["noise"] * 2.0**k).to(torch.int64))
    assert ns["z0"].grad is not None and ns["z0"].grad.shape == ns["noise"].shape
    assert len(ns["ts"]) == 51 and ns["edit"].shape == ns["noise"].shape
    assert float((ns["z_k"] - 80 * ns["noise"]).norm() / (80 * ns["noise"]).norm()) < 1e-14
    saved = bdia.state.load(tmp_path / "z.pt")  # the inverted real latent of the editing example
    assert saved.t == 981.0 and saved.x.shape == ns["noise"].shape and bool(torch.isfinite(saved.x).all())
