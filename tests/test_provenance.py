"""A state knows where it came from: the grid its walks passed through and the solver that made it. Continuing it on
another grid or with another scheme, which the two times of the pair cannot tell, is refused before any model call;
continuing it on its own grid, in chunks, partially or after a save, is not."""

from __future__ import annotations

import math

import pytest
import torch

import bdia
from bdia.exact import Exact
from bdia.kdiffusion import invert_bdia, sample_bdia
from bdia.models import CountNFE, GaussianMixture
from bdia.report import relative_error
from bdia.schedules import EDM, DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, DDIMInverse, Euler, Heun
from bdia.state import State, load, save

SD = DiscreteVP.stable_diffusion()


def mixture(schedule=SD) -> CountNFE:
    return CountNFE(GaussianMixture.random(schedule, dim=8, components=3, std=0.5, seed=4))


def noise(n: int = 3, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))


def test_states_record_their_grid_and_solver_and_keep_them_through_save_and_load(tmp_path):
    model, ts = mixture(), SD.timesteps(10, "leading", steps_offset=1)
    out = bdia.sample(model, noise(), ts, BDIA(DDIM(), 0.5))
    assert out.grid == tuple(ts.tolist()) and out.solver == "BDIA(DDIM(), gamma=0.5, backward=DDIM())"
    back = bdia.invert(model, out, ts, BDIA(DDIM(), 0.5))
    assert back.grid == out.grid and back.solver == out.solver
    for name in ("s.pt", "s.safetensors"):
        save(out, tmp_path / name)
        again = load(tmp_path / name)
        assert again.grid == out.grid and again.solver == out.solver
        assert isinstance(again.grid[0], float)
    assert "grid=<11 times>" in repr(out) and "tensor(" not in repr(out)  # shapes, dtype and times, not the values
    # O-BELM is BDIA-DDIM with its gamma: one identity for one scheme
    assert bdia.solvers.identity(OBELM()) == bdia.solvers.identity(BDIA(DDIM(), bdia.solvers.obelm_gamma))


def test_another_step_count_of_a_grid_family_is_refused_before_any_model_call():
    """Every Stable Diffusion leading grid ends with (1, 0): a 50-step sample inverted on 20 steps was accepted and
    wrong. Now the state's grid says where its walk went next."""
    model = mixture()
    fifty, twenty = (SD.timesteps(n, "leading", steps_offset=1) for n in (50, 20))
    out = bdia.sample(model, noise(), fifty, BDIA())
    model.calls = 0
    with pytest.raises(
        ValueError, match="made on a grid whose next time after t=1.0 is 21.0, but this walk goes to 51"
    ):
        bdia.invert(model, out, twenty, BDIA())
    assert model.calls == 0
    # deliberately: an anonymous pair is checked only against its own two times (and is then approximate)
    forced = bdia.invert(model, out.replace(grid=None), twenty, BDIA())
    assert relative_error(forced.x, bdia.invert(model, out, fifty, BDIA()).x) > 1e-3
    # the other way round: an inverted state's grid is the sampling walk's way ahead
    z = bdia.invert(model, out, fifty, BDIA())
    other = fifty.clone()
    other[2] = fifty[2] + 5.0  # the same first two times, another way on
    with pytest.raises(ValueError, match="made on a grid whose next time after t=961.0 is 941.0"):
        bdia.sample(model, z, other, BDIA())


def test_karras_grids_sharing_their_end_are_told_apart():
    sigmas = {n: EDM().timesteps(n).float() for n in (10, 18)}
    gmm = GaussianMixture.random(EDM(), dim=8, components=3, std=0.5, seed=1)

    def denoiser(x, sigma):
        return gmm(x.double(), float(sigma[0])).x0.to(x.dtype)

    state = sample_bdia(denoiser, noise(scale=80.0).float(), sigmas[10], disable=True, return_state=True)
    with pytest.raises(ValueError, match="made on a grid"):
        invert_bdia(denoiser, state, sigmas[18], disable=True)
    assert torch.isfinite(invert_bdia(denoiser, state, sigmas[10], disable=True)).all()


@pytest.mark.parametrize("other", [BDIA(DDIM(), 0.5), OBELM(), BDIA(Heun()), EDICT(), Exact(BDIA())], ids=repr)
def test_a_state_is_continued_only_by_the_scheme_that_made_it(other):
    model, ts = mixture(), SD.timesteps(12, "leading", steps_offset=1)
    out = bdia.sample(model, noise(), ts, BDIA())
    model.calls = 0
    with pytest.raises(ValueError, match="was made by BDIA\\(DDIM\\(\\), gamma=1.0"):
        bdia.invert(model, out, ts, other)
    assert model.calls == 0
    # the same configuration built anew continues it exactly
    back = bdia.invert(model, out, ts, BDIA(DDIM(), 1.0))
    assert relative_error(back.x, noise()) < 1e-13


def test_chunks_strength_and_rows_continue_their_own_grid():
    model, ts = mixture(), SD.timesteps(20, "leading", steps_offset=1)
    z = noise()
    solver = BDIA()
    whole = bdia.sample(model, z, ts, solver)
    first = bdia.sample(model, z, ts[:10], solver)
    second = bdia.sample(model, first, ts[9:], solver)
    assert torch.equal(second.x, whole.x) and second.grid == whole.grid  # the chunks' grids merged
    assert relative_error(bdia.invert(model, second, ts, solver).x, z) < 1e-13
    # partial inversion (strength) then sampling the whole grid continues from where the pair sits
    part = bdia.invert(model, whole, ts, solver, strength=0.6)
    assert relative_error(bdia.sample(model, part, ts, solver, strength=0.6).x, whole.x) < 1e-13
    # a per-sample gamma is identified as such: a row of the state continues with its row of gamma
    gammas = torch.tensor([1.0, 0.9, 0.95], dtype=torch.float64)
    out = bdia.sample(model, z, ts, BDIA(DDIM(), gammas))
    one = bdia.invert(model, out[1], ts, BDIA(DDIM(), gammas[1:2]))
    assert relative_error(one.x, z[1:2]) < 1e-10


def test_anonymous_pairs_and_one_step_integrators_are_not_checked():
    model, ts = mixture(), SD.timesteps(10, "leading", steps_offset=1)
    x = noise()
    hand = State(x, x, float(ts[0]), float(ts[1]))
    assert bdia.sample(model, hand, ts, BDIA()).solver == bdia.solvers.identity(BDIA())
    # approximate DDIM inversion, then DDIM sampling: a one-step integrator has no identity to check
    z = bdia.invert(model, x, ts, DDIMInverse())
    assert z.solver is None and torch.isfinite(bdia.sample(model, z, ts, DDIM()).x).all()
    assert bdia.sample(model, z, ts, Euler()).grid == z.grid


def test_an_old_state_file_without_provenance_still_loads(tmp_path):
    d = State(noise(), noise(), 21.0, 1.0).state_dict()
    del d["grid"], d["solver"]
    torch.save(d, tmp_path / "old.pt")
    s = load(tmp_path / "old.pt")
    assert s.grid is None and s.solver is None


@pytest.mark.parametrize(
    "broken,match",
    [
        (lambda d: d.pop("x"), "lacks the entry 'x'"),
        (lambda d: d.update(grid=[3.0, 1.0]), "hold the state's own times"),
        (lambda d: d.update(grid="21, 1"), "grid"),
        (lambda d: d.update(solver=3), "solver must be None or a str"),
        (lambda d: d.update(type="Nope"), "unknown state type"),
    ],
)
def test_a_damaged_state_file_is_refused_naming_what_is_wrong(tmp_path, broken, match):
    d = State(noise(), noise(), 21.0, 1.0, grid=(21.0, 1.0, 0.0)).state_dict()
    broken(d)
    torch.save(d, tmp_path / "s.pt")
    with pytest.raises((ValueError, TypeError), match=match):
        load(tmp_path / "s.pt")


def test_safetensors_by_suffix_in_any_case_and_its_damage_named(tmp_path):
    pytest.importorskip("safetensors")
    s = State(noise(), noise(), 21.0, 1.0)
    save(s, tmp_path / "S.SAFETENSORS")
    assert (tmp_path / "S.SAFETENSORS").read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    assert torch.equal(load(tmp_path / "S.SAFETENSORS").x, s.x)
    from safetensors.torch import save_file

    save_file({"x": s.x}, str(tmp_path / "bad.safetensors"), metadata={"bdia.state": "{not json"})
    with pytest.raises(ValueError, match="not JSON"):
        load(tmp_path / "bad.safetensors")
    save_file({"x": s.x}, str(tmp_path / "missing.safetensors"), metadata={"bdia.state": '{"x_prev": {"tensor": "q"}}'})
    with pytest.raises(ValueError, match="names the tensor 'q'"):
        load(tmp_path / "missing.safetensors")


def test_the_amplification_refusal_errs_neither_way():
    """The estimate (one rounding's growth on unit Gaussian data) neither refuses published O-BELM on long trailing
    grids, which round-trip to rounding in float64, nor allows gamma = 0.5 over 50 steps in float64, whose round trip
    is off by percents (the previous parasitic-root product did both)."""
    model = mixture()
    for n in (300, 400):
        ts = SD.timesteps(n, "trailing")
        out = bdia.sample(model, noise(), ts, OBELM())
        assert relative_error(bdia.invert(model, out, ts, OBELM()).x, noise()) < 1e-13
    ts = SD.timesteps(50, "leading", steps_offset=1)
    half = BDIA(DDIM(), 0.5)
    out = bdia.sample(model, noise(), ts, half)
    model.calls = 0
    with pytest.raises(ValueError, match="can amplify rounding errors by up to"):
        bdia.invert(model, out, ts, half)
    assert model.calls == 0
    forced = bdia.invert(model, out, ts, half, max_amplification=math.inf)
    assert relative_error(forced.x, noise()) > 1e-3  # the refusal was right
    with pytest.warns(RuntimeWarning, match="can grow one rounding error"):  # between 1% and 10%: run, and say so
        bdia.invert(model, bdia.sample(model, noise(), ts[3:], half), ts[3:], half)
