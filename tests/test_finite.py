"""The walk's NaN/inf check: checking the final state once (and replaying to locate) names the same step as a
check after every step, for every solver of the family, including against a model that hides non-finite inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import bdia
from bdia.exact import Exact
from bdia.models import Model
from bdia.sampling import _FiniteCheck as FiniteCheck
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, DDIMInverse, DPMSolver2, Euler, Heun, ScaledHeun
from tests.conftest import grid, schedule

SOLVERS = {
    "BDIA": lambda: BDIA(DDIM()),
    "BDIA gamma=0.5": lambda: BDIA(DDIM(), gamma=0.5),
    "BDIA gamma=0": lambda: BDIA(DDIM(), gamma=0.0),
    "BDIA per-sample gamma": lambda: BDIA(DDIM(), gamma=torch.tensor([1.0, 0.5])),
    "BDIA Heun": lambda: BDIA(Heun()),
    "BDIA Euler": lambda: BDIA(Euler()),
    "O-BELM": lambda: OBELM(),
    "EDICT": lambda: EDICT(),
    "EDICT alternate": lambda: EDICT(alternate=True),
    "DDIM": lambda: DDIM(),
    "DDIMInverse": lambda: DDIMInverse(),
    "Heun": lambda: Heun(),
    "ScaledHeun": lambda: ScaledHeun(),
    "DPMSolver2": lambda: DPMSolver2(),
}


class EveryStep:
    """The same solver without ``nonfinite_persists``: the walk checks after every step (the reference)."""

    def __init__(self, solver):
        self.solver, self.nfe, self.order = solver, solver.nfe, solver.order
        if hasattr(solver, "plan"):  # the same walk (EDICT's plan sets the parity of an inversion)
            self.plan = lambda model, walk, forward, like: solver.plan(model, walk, forward, like)

    def init(self, *a, **kw):
        return self.solver.init(*a, **kw)

    def step(self, *a, **kw):
        return self.solver.step(*a, **kw)

    def unstep(self, *a, **kw):
        return self.solver.unstep(*a, **kw)

    def amplification(self, *a):
        return self.solver.amplification(*a)


def hiding_net(poison_t: float, element: int, value: float):
    """An adversarial network: finite for any input (it maps NaN and inf in x to 0), so it never carries a
    non-finite latent forward itself, and returns ``value`` at ``element`` when called at time ``poison_t``."""

    def net(x, t):
        out = 0.1 * torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        if float(t[0]) == float(torch.tensor(poison_t, dtype=t.dtype)):
            out = out.clone()
            out.view(-1)[element] = value
        return out

    return net


def outcome(walk, *args):
    try:
        return "ok", walk(*args)
    except FloatingPointError as e:
        return "raised", str(e)


@given(
    name=st.sampled_from(sorted(SOLVERS)),
    prediction=st.sampled_from(["epsilon", "sample", "v"]),
    variant=st.integers(0, 4),
    forward=st.booleans(),
    where=st.integers(0, 5),
    element=st.integers(0, 7),
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_final_check_names_the_step_a_per_step_check_names(name, prediction, variant, forward, where, element, value):
    solver = SOLVERS[name]()
    assume(forward or name not in ("BDIA gamma=0",))  # (gamma = 0 cannot invert)
    s = schedule("sd")
    ts = grid("sd", 5, variant)
    model = Model(hiding_net(float(ts[where % len(ts)]), element, value), s, prediction)
    x = torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
    walk = bdia.sample if forward else bdia.invert
    reference = outcome(walk, model, x, ts, EveryStep(solver))
    got = outcome(walk, model, x, ts, solver)
    assert got[0] == reference[0]
    if got[0] == "ok":
        assert torch.equal(got[1].x, reference[1].x) and torch.equal(got[1].x_prev, reference[1].x_prev)
    else:
        # the same message, plus how the deferred check located the step
        assert got[1] == reference[1].replace(
            "):", ") (located by replaying the walk with a check after every step):", 1
        )


def test_every_poisoned_step_is_found():
    """Not a vacuous equivalence: poisoning the evaluation at each grid time is reported at that step."""
    s = schedule("sd")
    ts = grid("sd", 5, 0)
    x = torch.zeros(2, 4, dtype=torch.float64)
    for j in range(5):
        model = Model(hiding_net(float(ts[j]), 3, math.nan), s, "epsilon")
        with pytest.raises(FloatingPointError, match=rf"in step {j + 1} of 5 .*located by replaying"):
            bdia.sample(model, x, ts, BDIA())


def test_a_model_that_does_not_reproduce_its_output_is_named():
    """The walk's final state is not finite but the replay's is: the error says so instead of naming a step."""
    s = schedule("sd")
    ts = grid("sd", 5, 0)
    calls = []

    def net(x, t):
        calls.append(float(t[0]))
        out = torch.zeros_like(x)
        if len(calls) == 2:  # the first walk's second evaluation only
            out[0, 0] = math.nan
        return out

    with pytest.raises(FloatingPointError, match="replay .* produced none: the model's output is not reproducible"):
        bdia.sample(Model(net, s), torch.zeros(2, 4), ts, BDIA())
    assert len(calls) == 10  # the walk and its replay, 5 evaluations each


def test_the_check_is_deferred_only_for_solvers_that_declare_it():
    """Deferred for the family; per step (one row of sums per grid point) for Exact and undeclared solvers."""
    ts = grid("sd", 5, 0).tolist()
    like = torch.zeros(2, 4)
    for solver in (BDIA(), OBELM(), EDICT(), DDIM(), Heun(), DPMSolver2()):
        assert not FiniteCheck.every_step(solver)
    for solver in (EveryStep(BDIA()), Exact(BDIA())):
        assert FiniteCheck.every_step(solver)
    assert FiniteCheck(ts, BDIA(), like).sums.shape == (6, 2)  # one row of sums per grid point


def _sealed_sample():
    """A state a checked walk made and a model counting its calls: what an inversion continues."""
    calls = []

    def net(x, t):
        calls.append(float(t[0]))
        return 0.1 * x

    model, ts = Model(net, schedule("sd")), grid("sd", 5, 0)
    state = bdia.sample(model, torch.linspace(-1.0, 1.0, 8).reshape(2, 4), ts, BDIA())
    calls.clear()
    return model, ts, state, calls


@pytest.mark.parametrize("which", ["x", "x_prev"])
@pytest.mark.parametrize("how", ["in place", "in place through a view"])
def test_a_state_edited_since_its_walk_is_checked_again(which, how):
    """A walk's result skips the input checks only while its latents are as the walk left it: an in-place edit (of the
    tensor or of a view, which share its version counter) is refused before any network call."""
    model, ts, state, calls = _sealed_sample()
    latent = getattr(state, which)
    (latent if how == "in place" else latent.view(-1)[3:5]).fill_(math.nan)
    with pytest.raises(FloatingPointError, match="in the input x"):
        bdia.invert(model, state, ts, BDIA())
    assert calls == []


def test_a_state_edited_behind_the_version_counter_is_named_after_its_walk():
    """A write that no version counter sees (through ``.data``) is found by the walk's final check, whose replay
    checks the input again and names it."""
    model, ts, state, calls = _sealed_sample()
    state.x_prev.data.view(-1)[2] = math.inf
    with pytest.raises(FloatingPointError, match="in the input x"):
        bdia.invert(model, state, ts, BDIA())
    assert len(calls) == 4  # the walk's four steps from the pair; its replay refused the input before any


def test_only_an_unwatched_checked_walk_vouches_for_its_state():
    """A walk with ``check_finite=False`` or with a callback (which sees, and may edit, the latents) returns a state
    that the next walk checks in full; ``replace``, ``to``, copies and pickles make states checked in full."""
    import copy
    import pickle

    from bdia.state import _sealed

    model, ts, state, _ = _sealed_sample()
    x = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    assert _sealed(state) and _sealed(bdia.invert(model, state, ts, BDIA()))
    assert not _sealed(bdia.sample(model, x, ts, BDIA(), check_finite=False))
    assert not _sealed(bdia.sample(model, x, ts, BDIA(), callback=lambda step: None))
    for made in (state.replace(), state.to(torch.float64), copy.copy(state), pickle.loads(pickle.dumps(state))):
        assert not _sealed(made)
    # and the checks it skips change no bits
    again = bdia.invert(model, state.replace(), ts, BDIA())
    skipped = bdia.invert(model, state, ts, BDIA())
    assert torch.equal(again.x, skipped.x) and torch.equal(again.x_prev, skipped.x_prev)


def test_a_walk_under_inference_mode_is_checked_again():
    """Inference tensors keep no version counter, so an edit in place inside ``torch.inference_mode`` is invisible to
    the mark: a state walked there is not vouched for, and the next walk refuses its edited input before any call."""
    from bdia.state import _sealed

    model, ts, _, calls = _sealed_sample()
    with torch.inference_mode():
        state = bdia.sample(model, torch.linspace(-1.0, 1.0, 8).reshape(2, 4), ts, BDIA())
        assert not _sealed(state)
        state.x.view(-1)[1] = math.nan
        calls.clear()
        with pytest.raises(FloatingPointError, match="in the input x"):
            bdia.invert(model, state, ts, BDIA())
    assert calls == []
