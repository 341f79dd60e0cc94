"""A walk's plan is its solver's definition computed once: the same bits as ``init``/``step``/``unstep`` called one by
one, for every solver and every route a prediction can take (a Model's output folded into the coefficients, a
denoiser's (x0, eps), a Model subclass that processes its prediction, a callback's recording wrapper), both
directions, with and without the walk writing into the latents it drops."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

import bdia
from bdia import sampling
from bdia.exact import Exact
from bdia.models import GaussianMixture, Model, Prediction
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, DDIMInverse, Euler, Heun, ScaledHeun
from bdia.state import State
from tests.conftest import gmm_net, grid, schedule

SOLVERS = {
    "BDIA": lambda: BDIA(DDIM()),
    "BDIA gamma=0.5": lambda: BDIA(DDIM(), 0.5),
    "BDIA gamma=0": lambda: BDIA(DDIM(), 0.0),
    "BDIA per-sample": lambda: BDIA(DDIM(), torch.tensor([1.0, 0.7, 0.9])),
    "BDIA Euler": lambda: BDIA(Euler()),
    "BDIA DDIMInverse": lambda: BDIA(DDIMInverse()),
    "BDIA Heun": lambda: BDIA(Heun()),
    "BDIA ScaledHeun backward": lambda: BDIA(ScaledHeun(), 1.0, backward=ScaledHeun()),
    "O-BELM": lambda: OBELM(),
    "O-BELM bounded": lambda: OBELM(max_root=1.0),
    "EDICT": lambda: EDICT(),
    "Exact": lambda: Exact(BDIA(DDIM(), 0.5)),
    "DDIM": lambda: DDIM(),
    "DDIMInverse": lambda: DDIMInverse(),
}


class Clipped(Model):
    """A Model that processes its prediction in ``__call__`` (as diffusers' clip_sample does): a walk must call it
    whole, never its parts."""

    def __call__(self, x, t, **kw):
        pred = super().__call__(x, t, **kw)
        return Prediction(pred.x0.clamp(-1.5, 1.5), pred.eps)


class Thresholded(Model):
    """A Model that processes its prediction in ``predict``: a walk must not bypass it through ``output``."""

    def predict(self, x, ready, **kw):
        pred = super().predict(x, ready, **kw)
        return Prediction(pred.x0.clamp(-1.5, 1.5), pred.eps)


def routes(kind: str) -> dict:
    gmm = GaussianMixture.random(schedule(kind), dim=6, components=3, std=0.5, seed=2)
    out = {"mixture (x0, eps)": gmm}
    for prediction in ("epsilon", "sample", "v", "velocity"):
        out[f"Model {prediction}"] = Model(gmm_net(gmm, prediction), gmm.schedule, prediction, time_dtype=torch.float64)
    out["Model subclass __call__"] = Clipped(gmm_net(gmm, "epsilon"), gmm.schedule, "epsilon", time_dtype=torch.float64)
    out["Model subclass predict"] = Thresholded(
        gmm_net(gmm, "sample"), gmm.schedule, "sample", time_dtype=torch.float64
    )
    return out


def by_definition(model, x, walk: list[float], solver, forward: bool) -> State:
    """The walk as its definition: ``init`` from a lone latent (or the given pair), then ``step`` / ``unstep`` at
    each grid time, states in sampling orientation, reported as ``bdia.sample`` / ``bdia.invert`` report them."""
    if isinstance(x, State):
        state, start = (x.flipped() if x.t_prev < x.t else x), 1 if x.coupled else 2
    else:
        state, start = solver.init(model, x, walk[0], walk[1]), 2
        if state.t_prev < state.t:
            state = state.flipped()
        if state.coupled:
            start = 1
    for t in walk[start:]:
        state = solver.step(model, state, t) if forward else solver.unstep(model, state, t)
    return state if forward or state.coupled else state.flipped()


def same_bits(a: State, b: State) -> bool:
    return torch.equal(a.x, b.x) and torch.equal(a.x_prev, b.x_prev) and (a.t_prev, a.t) == (b.t_prev, b.t)


@pytest.mark.parametrize("kind,variant", [("sd", 0), ("sd", 1), ("edm", 0), ("flow", 1), ("vp", 0)])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_the_plan_is_the_definition_to_the_bit(name, kind, variant):
    ts = grid(kind, 7, variant)
    walk = ts.tolist()
    pure_noise, clean = schedule(kind).at(walk[0]).alpha == 0, schedule(kind).at(walk[-1]).sigma == 0
    for route, model in routes(kind).items():
        solver = SOLVERS[name]()
        eps_model = route in ("Model epsilon", "Model subclass __call__")
        if (isinstance(solver, EDICT) and (route.startswith("Model subclass") or pure_noise)) or (
            eps_model and pure_noise
        ):
            continue  # (an epsilon model, and EDICT, cannot give x0 where alpha = 0)
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(3, 6, generator=g, dtype=torch.float64) * (80.0 if kind == "edm" else 1.0)
        data = model.schedule.at(walk[-1]).alpha * torch.randn(3, 6, generator=g, dtype=torch.float64)
        for dtype in (torch.float64, torch.float32):
            z, x0 = noise.to(dtype), data.to(dtype)
            lifted = {"max_amplification": float("inf")}
            out = bdia.sample(model, z, ts, solver, **lifted)
            assert same_bits(out, by_definition(model, z, walk, solver, True)), (route, dtype, "sample")
            seen: list[int] = []
            watched = bdia.sample(model, z, ts, solver, callback=lambda s, seen=seen: seen.append(s.i), **lifted)
            assert same_bits(watched, out) and seen == list(range(1, len(walk))), (route, "callback")
            if (solver.__class__ is BDIA and solver.gamma.constant == 0.0) or (
                isinstance(solver, OBELM) and pure_noise
            ):
                continue  # gamma = 0 cannot be inverted (O-BELM's is 0 on a step from pure noise)
            back = bdia.invert(model, out, ts, solver, **lifted)
            assert same_bits(back, by_definition(model, out, walk[::-1], solver, False)), (route, dtype, "invert")
            if isinstance(solver, EDICT):
                continue  # its plan starts an inversion of data with the official parity (test_edict_obelm)
            if clean and route in ("Model sample", "Model subclass predict"):
                continue  # (an x0 model cannot give the noise of clean data)
            inv = bdia.invert(model, x0, ts, solver, **lifted)
            assert same_bits(inv, by_definition(model, x0, walk[::-1], solver, False)), (route, dtype, "data")


@pytest.mark.parametrize("forward", [True, False])
def test_a_walk_that_writes_into_its_dropped_latents_keeps_the_bits_and_the_callers_tensors(monkeypatch, forward):
    """Large latents: the walk writes each step into the latent it drops (its own, never the caller's); the result is
    the same bits as a walk that allocates."""
    model = routes("sd")["Model epsilon"]
    ts = grid("sd", 9)
    noise = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    solver = BDIA(DDIM())
    start = noise if forward else bdia.sample(model, noise, ts, solver)
    walk = bdia.sample if forward else bdia.invert
    allocating = walk(model, start, ts, solver)
    keep = [t.clone() for t in ((start,) if forward else (start.x, start.x_prev))]
    monkeypatch.setattr(sampling, "_REUSE_BYTES", 0)
    reusing = walk(model, start, ts, solver)
    assert same_bits(reusing, allocating)
    assert all(torch.equal(a, b) for a, b in zip(keep, (start,) if forward else (start.x, start.x_prev), strict=True))


_DEFAULTS = (False, False, None, True, None, {})  # grad, progress, callback, check_finite, max_amplification, kw


def test_a_plan_is_kept_for_the_next_walk_but_not_for_a_changing_gamma_function():
    model = routes("sd")["Model epsilon"]
    ts = grid("sd", 8)
    noise = torch.randn(2, 6, dtype=torch.float64)
    solver = BDIA(DDIM())

    def kept(x, strength=None):
        return sampling._kept(sampling._Walk(model, x, ts, solver, True, strength, *_DEFAULTS), model)[1]

    bdia.sample(model, noise, ts, solver)
    first = kept(noise)
    assert first is not None and kept(noise) is first  # one plan for the same walk
    assert kept(noise[:1]) is None and kept(noise, 1.0) is None  # another batch, another strength: none yet
    bdia.sample(model, noise, ts, solver, strength=1.0)
    assert kept(noise, True) is None  # (True == 1.0, but True is no strength: it must reach cut's refusal)
    with pytest.raises(ValueError, match="strength"):
        bdia.sample(model, noise, ts, solver, strength=True)
    gamma = [1.0]
    moving = BDIA(DDIM(), lambda s, tp, t, tn: gamma[0])
    a = bdia.sample(model, noise, ts, moving).x
    gamma[0] = 0.5
    b = bdia.sample(model, noise, ts, moving).x  # a user's function is asked again at every walk
    assert torch.equal(a, bdia.sample(model, noise, ts, BDIA(DDIM(), 1.0)).x)
    assert torch.equal(b, bdia.sample(model, noise, ts, BDIA(DDIM(), 0.5)).x)


def test_a_kept_plan_follows_the_models_schedule():
    """A model whose schedule is replaced after a walk is walked on the new one (a plan's coefficients are its
    schedule's), over a grid both schedules take."""
    sd, flow = routes("sd")["Model epsilon"], routes("flow")["Model epsilon"]
    ts = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1], dtype=torch.float64)
    noise = torch.randn(2, 6, dtype=torch.float64)
    solver = BDIA(DDIM())
    model = Model(sd.net, sd.schedule, "epsilon", time_dtype=torch.float64)
    on_sd = bdia.sample(model, noise, ts, solver).x
    model.schedule = flow.schedule
    on_flow = bdia.sample(model, noise, ts, solver).x
    assert torch.equal(on_flow, bdia.sample(Model(sd.net, flow.schedule, "epsilon"), noise, ts, BDIA(DDIM())).x)
    assert not torch.equal(on_flow, on_sd)


def test_plans_serve_threads():
    """One cached plan, eight threads: each walk equals the serial one."""
    model = routes("flow")["Model velocity"]
    ts = grid("flow", 12, 1)
    solver = BDIA(Euler())
    inputs = [torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    serial = [bdia.invert(model, bdia.sample(model, z, ts, solver), ts, solver) for z in inputs]
    results: list = [None] * 8

    def run(i: int) -> None:
        results[i] = bdia.invert(model, bdia.sample(model, inputs[i], ts, solver), ts, solver)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(same_bits(a, b) for a, b in zip(results, serial, strict=True))


def test_a_subclass_that_redefines_a_step_is_walked_by_its_own_steps():
    """The plan computes BDIA's own step in advance; a subclass that changes ``step`` must be walked by it."""
    calls = []

    class Logged(BDIA):
        def step(self, model, state, t_next, **kw):
            if model is walked:  # (not the amplification's probe of the solver)
                calls.append(t_next)
            return super().step(model, state, t_next, **kw)

    model = walked = routes("sd")["Model epsilon"]
    ts = grid("sd", 6)
    x = torch.randn(2, 6, dtype=torch.float64)
    out = bdia.sample(model, x, ts, Logged(DDIM()))
    assert calls == ts.tolist()[2:] and torch.equal(out.x, bdia.sample(model, x, ts, BDIA(DDIM())).x)


def _latents_alive(shape: tuple) -> int:
    """Distinct storages of tensors shaped ``shape`` alive now."""
    with warnings.catch_warnings():  # (isinstance on every live object touches torch's deprecated module attributes)
        warnings.simplefilter("ignore", FutureWarning)
        return len(
            {
                o.untyped_storage().data_ptr()
                for o in gc.get_objects()
                if isinstance(o, torch.Tensor) and o.shape == shape
            }
        )


@pytest.mark.parametrize("watched", [False, True])
@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("reuse", [False, True])
def test_a_walk_holds_its_pair_and_nothing_more(monkeypatch, watched, forward, reuse):
    """At every network call of a BDIA walk the latents alive beyond those alive before it are the pair the walk
    continues (a scratch tensor more when it writes into the latents it drops), whatever N: nothing from its first
    steps is kept, whether the plan runs the steps in its own loop or a callback watches each."""
    shape = torch.Size((2, 3, 5, 7))
    if reuse:
        monkeypatch.setattr(sampling, "_REUSE_BYTES", 0)
    counts: list[int] = []

    def net(z, t):
        counts.append(_latents_alive(shape))
        return torch.full(shape, 0.1)

    model, solver = Model(net, schedule("sd"), "epsilon"), BDIA(DDIM())
    for n in (5, 20):
        ts = grid("sd", n)
        x = torch.randn(shape)
        start = x if forward else bdia.sample(model, x, ts, solver)
        counts.clear()
        before = _latents_alive(shape)
        walk = bdia.sample if forward else bdia.invert
        walk(model, start, ts, solver, callback=(lambda step: None) if watched else None)
        assert max(counts) - before <= 2 + reuse, (n, before, counts)
