"""How much a walk grows its rounding: the estimate a walk checks before any network call, against measured walks.

For each case (solver, grid, dtype, denoiser) the table gives ``solver.amplification`` (the growth of one rounding
error on unit-variance Gaussian data, ``bdia.solvers.linear_growth``), the error it predicts (``amplification x eps``
of the dtype), what the walk does by default (run, warn, refuse: ``bdia.sampling.limits``), and the measured error
of the same walk forced to run: the relative round-trip error of noise -> sample -> invert, and for sampling in half
precision the error of the sample against the same walk in float64. Denoisers: the analytic Gaussian mixture (its
predictions are smooth, as the estimate assumes) and a random convolutional network (its own Jacobian grows errors,
which the estimate does not see: the "ratio" column shows by how much).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

import bdia
from bdia.models import GaussianMixture, Model
from bdia.report import relative_error
from bdia.sampling import limits
from bdia.schedules import EDM, DiscreteVP, Flow
from bdia.solvers import BDIA, DDIM, OBELM, Euler, Heun
from benchmarks import outputs, print_table, save, threads

__all__ = ["run"]

SD = DiscreteVP.stable_diffusion()


class RandomConvNet(nn.Module):
    """A seeded random network with torch's default initialisation (conv, SiLU, conv, a time-dependent gain): a
    denoiser with a Jacobian of its own, of the size an untrained network has."""

    def __init__(self, channels: int = 4, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
            self.out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / (1.0 + t.to(x.dtype) / 1000.0)
        return self.out(nn.functional.silu(self.inp(x) * scale[:, None, None, None]))


def _cases(quick: bool) -> list[dict]:
    n = 20 if quick else 50
    sd = SD.timesteps(n, "leading", steps_offset=1)
    cases = [
        dict(case=f"BDIA gamma=1, SD leading {n}", solver=BDIA(DDIM(), 1.0), schedule=SD, grid=sd),
        dict(case=f"BDIA gamma=0.9, SD leading {n}", solver=BDIA(DDIM(), 0.9), schedule=SD, grid=sd),
        dict(case=f"BDIA gamma=0.5, SD leading {n}", solver=BDIA(DDIM(), 0.5), schedule=SD, grid=sd),
        dict(case="O-BELM, SD leading 20", solver=OBELM(), schedule=SD,
             grid=SD.timesteps(20, "leading", steps_offset=1)),
        dict(case="BDIA(Euler) gamma=0.5, Flow shift 3, 28", solver=BDIA(Euler(), 0.5), schedule=Flow(),
             grid=Flow().timesteps(28, shift=3.0)),
        dict(case="BDIA(Heun) gamma=1, EDM 18", solver=BDIA(Heun(), 1.0), schedule=EDM(), grid=EDM().timesteps(18)),
    ]  # fmt: skip
    if not quick:
        cases.insert(
            4, dict(case="O-BELM, SD trailing 300", solver=OBELM(), schedule=SD, grid=SD.timesteps(300, "trailing"))
        )
    return cases


def _measure(model, schedule, grid, solver, dtype, scale: float, shape) -> dict:
    """Round trip noise -> sample -> invert, and the sample's error against the float64 walk, both forced to run."""
    g = torch.Generator().manual_seed(0)
    noise = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    lifted = {"max_amplification": math.inf, "check_finite": False}  # (a diverging walk is a measurement too)
    ref = bdia.sample(model(torch.float64), noise, grid, solver, **lifted).x
    m = model(dtype)
    out = bdia.sample(m, noise.to(dtype), grid, solver, **lifted)
    back = bdia.invert(m, out, grid, solver, **lifted)
    return {"round trip": relative_error(back.x, noise), "sample vs float64": relative_error(out.x, ref)}


def run(quick: bool = False, results_dir: Path | None = None, img_dir: Path | None = None) -> dict:
    results_dir, _ = outputs(quick, results_dir, img_dir)
    rows = []
    with threads(1):
        for c in _cases(quick):
            schedule, grid, solver = c["schedule"], c["grid"], c["solver"]
            gmm = GaussianMixture.random(schedule, dim=64, components=4, std=0.5, seed=1)

            def mixture(dtype: torch.dtype, gmm=gmm):
                return gmm  # (exact predictions, computed in float64 and returned in the latent's dtype)

            net = RandomConvNet().eval().requires_grad_(False)

            def convnet(dtype: torch.dtype, net=net, schedule=schedule):
                prediction = "velocity" if isinstance(schedule, Flow) else "epsilon"  # (alpha = 0 at Flow's t = 1)
                return Model(_cast(net, dtype), schedule, prediction)

            scale = 80.0 if isinstance(schedule, EDM) else 1.0
            for name, model, shape in (("mixture", mixture, (16, 64)), ("random conv net", convnet, (4, 4, 8, 8))):
                dtypes = (torch.float64, torch.float32, torch.float16) if name == "mixture" else (torch.float32,)
                if name == "mixture" and isinstance(schedule, EDM):
                    dtypes = (*dtypes, torch.bfloat16)
                for dtype in dtypes:
                    if isinstance(schedule, EDM) and dtype == torch.float64:
                        continue
                    if not isinstance(schedule, EDM) and dtype == torch.float16 and "gamma=1," not in c["case"]:
                        continue
                    times = grid.tolist()
                    amp = max(solver.amplification(schedule, times, True), solver.amplification(schedule, times, False))
                    refuse, warn = limits(dtype)
                    eps = torch.finfo(dtype).eps
                    got = _measure(model, schedule, grid, solver, dtype, scale, shape)
                    measured = (
                        got["sample vs float64"] if dtype in (torch.float16, torch.bfloat16) else got["round trip"]
                    )
                    rows.append(
                        {
                            "case": c["case"],
                            "denoiser": name,
                            "dtype": str(dtype).replace("torch.", ""),
                            "amplification": amp,
                            "predicted (amp x eps)": amp * eps,
                            "default": "refused" if amp > refuse else "warned" if amp > warn else "runs",
                            "measured": measured,
                            "what": "sample vs float64" if dtype in (torch.float16, torch.bfloat16) else "round trip",
                            "ratio measured / predicted": measured / (amp * eps),
                        }
                    )
    print_table(rows, "Amplification estimate (checked before any network call) against measured walks")
    payload = {"quick": quick, "rows": rows}
    save(results_dir, "rounding", payload)
    return payload


def _cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    return nn.Module.to(copy.deepcopy(net), dtype)
