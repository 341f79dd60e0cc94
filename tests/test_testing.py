"""``bdia.testing`` checked against deliberately broken integrators, solvers and denoisers (each check must fail, with
a message that names the cause), and against correct ones on random float32 networks (no false alarm)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import bdia
from bdia import testing
from bdia.integrators import DDIM, Euler, Heun
from bdia.models import CFG, GaussianMixture, Model
from bdia.schedules import EDM, DiscreteVP, Flow
from bdia.solvers import BDIA, EDICT, OBELM
from bdia.state import State
from bdia.testing import strategies as bst
from bdia.testing.accuracy import RK4, OrderProblem, reference

SD = DiscreteVP.stable_diffusion()


def _noise(schedule, t: float, shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    k = schedule.at(t)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z * math.hypot(k.alpha, k.sigma)).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# broken solvers: an inexact inverse is caught, and where the trajectories parted is named


class TwoStep:
    """A user's own two-step solver: BDIA's update written with BDIA's public ``drift`` (a solver of the protocol,
    with no plan, so that bdia.sample and bdia.invert run its own step and unstep)."""

    def __init__(self, integrator=None, gamma: float = 1.0):
        self.bdia = BDIA(integrator or DDIM(), gamma)
        self.gamma, self.nfe, self.order = gamma, self.bdia.nfe, self.bdia.order
        self.nonfinite_persists = True

    def init(self, model, x, t, t_next, **kw):
        return self.bdia.init(model, x, t, t_next, **kw)

    def step(self, model, state, t_next, **kw):
        if state.coupled:
            raise ValueError("TwoStep continues a pair of consecutive points")
        F = self.bdia.drift(model, state.x, state.t_prev, state.t, t_next, **kw).tensor()
        return State(state.x, self.gamma * state.x_prev + F, state.t, t_next)

    def unstep(self, model, state, t_prev, **kw):
        if state.coupled:
            raise ValueError("TwoStep continues a pair of consecutive points")
        F = self.bdia.drift(model, state.x_prev, t_prev, state.t_prev, state.t, **kw).tensor()
        return State((state.x - F) / self.gamma, state.x_prev, t_prev, state.t_prev)

    def amplification(self, schedule, times, forward):
        return self.bdia.amplification(schedule, times, forward)

    def __repr__(self):
        return f"{type(self).__name__}(gamma={self.gamma})"


class WrongCoefficient(TwoStep):
    """Its unstep divides by gamma (1 + delta): an inverse off by a relative ``delta`` per step."""

    def __init__(self, integrator=None, gamma: float = 1.0, delta: float = 1e-4):
        super().__init__(integrator, gamma)
        self.delta = delta

    def unstep(self, model, state, t_prev, **kw):
        F = self.bdia.drift(model, state.x_prev, t_prev, state.t_prev, state.t, **kw).tensor()
        return State((state.x - F) / (self.gamma * (1 + self.delta)), state.x_prev, t_prev, state.t_prev)


class WrongSide(TwoStep):
    """Its unstep takes the backward neighbour from the wrong side of the grid (a third-party port's bug)."""

    def unstep(self, model, state, t_prev, **kw):
        F = self.bdia.drift(model, state.x_prev, state.t, state.t_prev, t_prev, **kw).tensor()
        return State((state.x - F) / self.gamma, state.x_prev, t_prev, state.t_prev)


BROKEN_WALKS = [
    ("SD eps", SD, SD.timesteps(20, "leading", steps_offset=1), "epsilon", (False, True)),
    ("EDM x0", EDM(), EDM().timesteps(12, final_zero=False), "sample", (False,)),
    ("Flow velocity", Flow(), Flow().timesteps(12, shift=3.0), "velocity", (False, True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name,schedule,ts,prediction,directions", BROKEN_WALKS, ids=[w[0] for w in BROKEN_WALKS])
@pytest.mark.parametrize(
    "solver",
    [WrongCoefficient(DDIM(), 1.0), WrongCoefficient(DDIM(), 0.9), WrongSide(DDIM(), 1.0)],
    ids=["coefficient-1e-4", "coefficient-1e-4-gamma-0.9", "wrong-side"],
)
def test_an_inexact_inverse_fails_and_says_where(solver, name, schedule, ts, prediction, directions, dtype):
    model = testing.random_model(schedule, prediction, seed=2, dtype=dtype)
    x = _noise(schedule, float(ts[0]), (2, 2, 8, 8), dtype=dtype)
    data = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    for from_data in directions:
        r = testing.round_trip(model, data if from_data else x, ts, solver, from_data=from_data)
        assert not r.ok and r.parted is not None and r.parted <= 3, str(r)
        assert r.ratio > 10  # not a near miss: the model's bound is far below an inverse off by 1e-4 per step
    with pytest.raises(AssertionError, match=r"FAILED(.|\n)*growth over the second walk(.|\n)*trajectories parted at"):
        testing.assert_round_trip(model, x, ts, solver)


def test_a_coefficient_off_by_one_part_in_a_million_is_caught_in_float64_and_at_the_edge_in_float32():
    """The bound is a few roundings per step times the walk's growth: in float64 an inverse off by 1e-6 per step is
    1e8 times past it; in float32 (u = 6e-8) it is at the edge of what rounding could explain."""
    ts = SD.timesteps(20, "leading", steps_offset=1)
    for dtype, least in ((torch.float64, 1e6), (torch.float32, 1.0)):
        model = testing.random_model(SD, "epsilon", seed=2, dtype=dtype)
        r = testing.round_trip(model, _noise(SD, 981.0, (2, 2, 8, 8), dtype=dtype), ts, WrongCoefficient(delta=1e-6))
        assert r.ratio > least, str(r)


# ---------------------------------------------------------------------------------------------------------------
# no false alarm: correct solvers on random float32 networks, SD, Flow and EDM grids, every parametrisation

NETWORK_WALKS = [
    ("sd", SD, lambda n: SD.timesteps(n, "leading", steps_offset=1), ("epsilon", "sample", "v", "velocity")),
    ("sd-trailing", SD, lambda n: SD.timesteps(n, "trailing", set_alpha_to_one=True), ("epsilon", "v", "velocity")),
    ("flow", Flow(), lambda n: Flow().timesteps(n, shift=3.0), ("sample", "v", "velocity")),
    ("edm", EDM(), lambda n: EDM().timesteps(n), ("epsilon", "v", "velocity")),
    ("edm-x0", EDM(), lambda n: EDM().timesteps(n, final_zero=False), ("sample",)),
]
CORRECT = [
    BDIA(DDIM(), 1.0),
    BDIA(DDIM(), 0.9),
    BDIA(Heun(), 1.0),
    BDIA(Euler(), 0.8, backward=Euler()),
    OBELM(max_root=1.0),
    EDICT(),
    EDICT(Euler(), alternate=True),
]


@settings(max_examples=30, deadline=None)
@given(
    walk=st.sampled_from(NETWORK_WALKS),
    data=st.data(),
    solver=st.sampled_from(CORRECT),
    n=st.integers(2, 30),
    seed=st.integers(0, 2**16),
    gain=st.sampled_from([1.0, 2.0]),
)
def test_no_false_alarm_on_random_float32_networks(walk, data, solver, n, seed, gain):
    _, schedule, grid, predictions = walk
    ts = grid(n)
    if isinstance(solver, EDICT | OBELM) and schedule.at(float(ts[0])).alpha == 0:
        solver = BDIA(DDIM(), 1.0)  # (both divide by alpha at the first step: not for walks from pure noise)
    prediction = data.draw(st.sampled_from(predictions))
    model = testing.random_model(schedule, prediction, seed=seed, gain=gain)
    x = _noise(schedule, float(ts[0]), (2, 2, 4, 8), seed=seed)
    inverting_data_is_defined = not (prediction == "sample" and schedule.at(float(ts[-1])).sigma == 0)
    for from_data in (False, True) if inverting_data_is_defined else (False,):
        start = torch.randn(2, 2, 4, 8, generator=torch.Generator().manual_seed(seed + 1)) if from_data else x
        try:
            r = testing.round_trip(model, start, ts, solver, from_data=from_data, growth=True)
        except ValueError:  # a walk bdia refuses in float32 (O-BELM's amplification on two EDM steps: 1.6e9)
            assume(False)
        assert r.ok, str(r)


def test_the_constant_bound_breaks_where_the_measured_growth_holds():
    """The old tolerance ``4 eps N M prod max(1, 1/gamma)`` (eps = 2u, M the largest state norm on the walks) was
    calibrated on the analytic mixture. A random x0 network on an EDM grid grows a perturbation 5e3x over the
    inversion: the float32 round trip's error is 7x that constant bound, and within the measured one."""
    ts = EDM().timesteps(18, final_zero=False)
    model = testing.random_model(EDM(), "sample", seed=0)
    x = _noise(EDM(), 80.0, (4, 2, 8, 8))
    r = testing.round_trip(model, x, ts, BDIA(DDIM(), 1.0), growth=True)
    seen: list[State] = []
    out = bdia.sample(model, x, ts, BDIA(DDIM(), 1.0), callback=lambda s: seen.append(s.state))
    bdia.invert(model, out, ts, BDIA(DDIM(), 1.0), callback=lambda s: seen.append(s.state))
    m = max(float(s.x.double().norm()) for s in seen)
    old = 4 * torch.finfo(torch.float32).eps * (len(ts) - 1) * m
    whole = float(torch.linalg.vector_norm(r.error))  # the old test's error: the whole batch's norm
    assert whole > 3 * old and r.ok and float(r.growth.max()) > 1e3, (whole, old, str(r))


# ---------------------------------------------------------------------------------------------------------------
# the round-trip API


def test_a_bound_that_cannot_fail_is_refused_not_passed():
    """bfloat16 over 12 steps: its rounding alone spans the data; the check could not show an inexact inverse."""
    gmm = GaussianMixture.random(SD, dim=8, components=3, std=0.5, seed=1)
    ts = SD.timesteps(12, "leading", steps_offset=1)
    x = _noise(SD, 981.0, (2, 8), dtype=torch.bfloat16)
    r = testing.round_trip(gmm, x, ts, BDIA(DDIM(), 1.0))
    assert not r.checkable
    with pytest.raises(ValueError, match="cannot show an inexact inverse"):
        testing.assert_round_trip(gmm, x, ts, BDIA(DDIM(), 1.0))


def test_round_trip_reports_and_bad_arguments():
    gmm = GaussianMixture.random(SD, dim=8, components=3, std=0.5, seed=1)
    ts = SD.timesteps(10, "leading", steps_offset=1)
    x = _noise(SD, 981.0, (3, 8), dtype=torch.float64)
    data = gmm.sample(3, generator=torch.Generator().manual_seed(2))
    both = testing.assert_round_trip(gmm, x, ts, BDIA(DDIM(), 1.0), data=data)
    assert [r.direction for r in both] == ["sample, then invert", "invert, then sample"]
    lazy, full = both[0], testing.round_trip(gmm, x, ts, BDIA(DDIM(), 1.0), growth=True)
    assert lazy.growth is None and full.growth is not None and full.growth.shape == (3,)
    assert bool((full.bound >= lazy.bound).all())  # the bound with growth and noise contains the one without
    assert "within the rounding model" in str(full) and full.parted is None and full.ratio < 1
    assert len(full.times) == len(ts) - 1 and full.errors.shape == (len(ts) - 1, 3)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        testing.round_trip(gmm, x.long(), ts, BDIA())
    with pytest.raises(ValueError, match="roundings must be an int"):
        testing.round_trip(gmm, x, ts, BDIA(), roundings=0)
    with pytest.raises(ValueError, match="max_relative_bound"):
        testing.round_trip(gmm, x, ts, BDIA(), max_relative_bound=-1.0)
    with pytest.raises(TypeError, match="growth must be None, True or False"):
        testing.round_trip(gmm, x, ts, BDIA(), growth="yes")
    with pytest.raises(ValueError, match="pass x"):
        testing.assert_round_trip(gmm, None, ts, BDIA())


def test_exact_arithmetic_round_trips_are_checked_to_the_bit():
    from bdia.exact import Exact

    gmm = GaussianMixture.random(SD, dim=8, components=3, std=0.5, seed=1)
    ts = SD.timesteps(10, "leading", steps_offset=1)
    x = _noise(SD, 981.0, (3, 8))
    (r,) = testing.assert_round_trip(gmm, x, ts, Exact(BDIA(DDIM(), 0.5)), bitwise=True)
    assert r.ok and r.ratio == 0.0 and "exact to the bit" in str(r)
    # the float solver is not bitwise: the same claim fails for it
    assert not testing.round_trip(gmm, x, ts, BDIA(DDIM(), 0.5), bitwise=True, max_amplification=math.inf).ok


def test_a_float64_shadow_measures_the_growth_of_a_network_that_runs_only_in_float32():
    ts = EDM().timesteps(10, final_zero=False)
    model = testing.random_model(EDM(), "sample", seed=1)
    shadow = testing.random_model(EDM(), "sample", seed=1, dtype=torch.float64)
    x = _noise(EDM(), 80.0, (2, 2, 4, 4))
    own = testing.round_trip(model, x, ts, BDIA(DDIM(), 1.0), growth=True)
    shadowed = testing.round_trip(model, x, ts, BDIA(DDIM(), 1.0), growth=True, shadow=shadow)
    assert "float32" in own.probe and "float64 (shadow denoiser)" in shadowed.probe
    assert own.ok and shadowed.ok
    # the same growth either way, to the accuracy of float32 finite differences
    assert torch.allclose(own.growth, shadowed.growth, rtol=0.1)


def test_bdia_testing_imports_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import bdia.testing as t\n"
        "try:\n    t.strategies\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'bdia[testing]'" in out.stdout


# ---------------------------------------------------------------------------------------------------------------
# check_integrator: each broken contract is named


class ClaimsSecondOrder(Euler):
    order = 2


class ClaimsOneEvaluation(Heun):
    nfe = 1


class ClampsInPlace(DDIM):
    def __call__(self, model, x, t, s, pred=None, **kw):
        out = super().__call__(model, x, t, s, pred, **kw)
        x.clamp_(-50.0, 50.0)
        return out


class Upcasts(DDIM):
    def __call__(self, model, x, t, s, pred=None, **kw):
        return super().__call__(model, x, t, s, pred, **kw).double()


class CouplesTheBatch(Heun):
    def __call__(self, model, x, t, s, pred=None, **kw):
        out = super().__call__(model, x, t, s, pred, **kw)
        return out + 1e-3 * (s - t) * (x - x.mean(0, keepdim=True))


class Counts(Euler):
    """Coefficients that depend on how often they were asked for (a memo keyed on nothing)."""

    calls = 0

    def coefficients(self, schedule, t, s):
        Counts.calls += 1
        A, B, C = super().coefficients(schedule, t, s)
        return A, B * (1 + 1e-3 * (Counts.calls % 2)), C


class ForgetsItsFirstOrder(Heun):
    @property
    def first_order(self):
        return self  # Integrator's default: a 2-NFE "first-order" step


class HalfEuler(Euler):
    def coefficients(self, schedule, t, s):
        A, B, C = super().coefficients(schedule, t, s)
        return A, 0.5 * B, 0.5 * C


class InconsistentFirstOrder(Heun):
    @property
    def first_order(self):
        return HalfEuler()  # a first-order step of another ODE


class SwallowsNaN(DDIM):
    def __call__(self, model, x, t, s, pred=None, **kw):
        return torch.nan_to_num(super().__call__(model, x, t, s, pred, **kw))


@pytest.mark.parametrize(
    "integrator,check,message",
    [
        (ClaimsSecondOrder(), "the declared order is measured", r"declares order = 2(.|\n)*do not follow a h\^2"),
        (ClaimsOneEvaluation(), "nfe is the number of evaluations", "declares nfe = 1 but made 2"),
        (ClampsInPlace(), "no input is modified", "modified its input x in place"),
        (Upcasts(), "dtype and device kept", "turned a torch.float32 latent into torch.float64"),
        (CouplesTheBatch(), "batch equals a loop over samples", "a batch and a loop over its samples"),
        (Counts(), "coefficients are a function of the times alone", "changed between calls"),
        (ForgetsItsFirstOrder(), "first_order is consistent", "it must be the first-order step that uses only"),
        (InconsistentFirstOrder(), "first_order is consistent", "do not solve the same ODE to first order"),
        (SwallowsNaN(), "non-finite values are carried", "did not reach the step"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, object) and not isinstance(v, str) else None,
)
def test_check_integrator_names_the_broken_contract(integrator, check, message):
    checks = {c.name: c for c in testing.integrator_checks(integrator)}
    with pytest.raises(AssertionError, match=message):
        checks[check]()
    with pytest.raises(AssertionError, match=check):
        testing.check_integrator(integrator, order=check == "the declared order is measured")


# ---------------------------------------------------------------------------------------------------------------
# check_solver


class UnderDeclares(TwoStep):
    def amplification(self, schedule, times, forward):
        return 1.0  # whatever gamma is


class AcceptsAnything(TwoStep):
    """Continues coupled copies as if they were a pair."""

    def step(self, model, state, t_next, **kw):
        F = self.bdia.drift(model, state.x, state.t_prev, state.t, t_next, **kw).tensor()
        return State(state.x, self.gamma * state.x_prev + F, state.t, t_next)


class OverwritesItsInput(TwoStep):
    def step(self, model, state, t_next, **kw):
        out = super().step(model, state, t_next, **kw)
        state.x_prev.mul_(0.5)
        return out


class ClaimsTwoEvaluations(TwoStep):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.nfe = 2


class ClaimsSecondOrder2(TwoStep):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.order = 2


class OverridesUnstepOnly(BDIA):
    """A BDIA subclass with its own (here: wrong) unstep: bdia.invert walks by it (a plan is BDIA's own steps only),
    so the round trips find it."""

    def unstep(self, model, state, t_prev, **kw):
        back = super().unstep(model, state, t_prev, **kw)
        return back.replace(x_prev=back.x_prev * (1 + 1e-4))


@pytest.mark.parametrize(
    "solver,check,message",
    [
        (WrongSide(DDIM(), 1.0), "unstep inverts step (round trips)", "trajectories parted at point 1"),
        (UnderDeclares(DDIM(), 0.5), "the declared amplification is measured", r"declares 1 for inverting SD"),
        (AcceptsAnything(DDIM(), 1.0), "states it makes, accepts and refuses", "step accepted coupled copies"),
        (OverwritesItsInput(DDIM(), 1.0), "steps are pure functions of their inputs", "modified a state it was given"),
        (ClaimsTwoEvaluations(DDIM(), 1.0), "nfe is the number of evaluations", "declares nfe = 2, but a step made 1"),
        (ClaimsSecondOrder2(DDIM(), 0.5), "the declared order is measured", r"declares order = 2"),
        (OverridesUnstepOnly(DDIM(), 1.0), "unstep inverts step (round trips)", "FAILED"),
    ],
    ids=["wrong-side", "under-declared", "accepts-coupled", "overwrites", "nfe", "order", "own-unstep"],
)
def test_check_solver_names_the_broken_contract(solver, check, message):
    checks = {c.name: c for c in testing.solver_checks(solver)}
    with pytest.raises(AssertionError, match=message):
        checks[check]()


def test_check_solver_passes_a_custom_solver_in_one_line():
    """A user's own two-step scheme (BDIA's equations through the protocol alone) and BDIA over Heun with a Heun
    backward step at gamma 0.8 pass every check."""
    testing.check_solver(TwoStep(DDIM(), 0.8))
    testing.check_solver(BDIA(Heun(), 0.8, backward=Heun()), order=False)


# ---------------------------------------------------------------------------------------------------------------
# check_denoiser: what breaks exact inversion is named


class Net(torch.nn.Module):
    def __init__(self, extra: torch.nn.Module | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(8, 8, generator=g) / 3)
        self.extra = extra if extra is not None else torch.nn.Identity()

    def forward(self, x, t):
        return self.extra(torch.tanh(x @ self.w + torch.sin(t[:, None] / 100)))


def _denoiser(net) -> Model:
    return Model(net, SD, "epsilon")


class Jitter(torch.nn.Module):
    """Rounding-sized noise, as a GPU's atomics and reduction order make."""

    def forward(self, h):
        return h * (1 + 2**-23 * torch.randn_like(h))


class Noisy(torch.nn.Module):
    def forward(self, h):
        return h + 0.1 * torch.randn_like(h)


class BatchNormalised(torch.nn.Module):
    def forward(self, h):
        return h - 0.1 * h.mean(0, keepdim=True)


class RoundsAloneDifferently(torch.nn.Module):
    def forward(self, h):
        return h * (1 + 2**-20) if h.shape[0] == 1 else h


class TimeCache:
    """A denoiser that caches its network's output per batch size: stale at the next time."""

    def __init__(self, model):
        self.model, self.schedule, self.cache = model, model.schedule, {}

    def __call__(self, x, t, **kw):
        key = x.shape[0]
        if key not in self.cache:
            self.cache[key] = self.model(x, t, **kw)
        return self.cache[key]


class ClampingNet(Net):
    def forward(self, x, t):
        x.clamp_(-1.0, 1.0)
        return super().forward(x, t)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize(
    "make,check,message",
    [
        (lambda: _denoiser(Net(torch.nn.Dropout(0.1))), "modules in eval mode", r"training mode(.|\n)*Dropout"),
        (lambda: _denoiser(Net(torch.nn.Dropout(0.1))), "the same bits for the same input", "dropout left on"),
        (lambda: _denoiser(Net(Jitter()).eval()), "the same bits for the same input", "non-deterministic kernels"),
        (lambda: _denoiser(Net(Noisy()).eval()), "the same bits for the same input", "random sampling inside"),
        (lambda: _denoiser(Net(BatchNormalised()).eval()), "bits independent of the rest of the batch", "guidance"),
        (lambda: TimeCache(_denoiser(Net().eval())), "a function of (x, t) alone", "stale"),
        (lambda: _denoiser(ClampingNet().eval()), "no input is modified", "modified its input latent in place"),
    ],
    ids=["dropout-mode", "dropout-bits", "kernels", "noise", "batch", "cache", "mutation"],
)
def test_check_denoiser_names_what_breaks_exact_inversion(make, check, message):
    model = make()
    checks = {c.name: c for c in testing.denoiser_checks(model, X, 501.0)}
    with pytest.raises(AssertionError, match=message):
        checks[check]()
    with pytest.raises(AssertionError, match=check.replace("(", r"\(").replace(")", r"\)")):
        testing.check_denoiser(model, X, 501.0)


def test_check_denoiser_passes_deterministic_networks_and_guidance():
    testing.check_denoiser(_denoiser(Net().eval()), X, 501.0)
    # a network that rounds a batch of one differently (as a CPU matrix-vector product may) passes unless asked
    testing.check_denoiser(_denoiser(Net(RoundsAloneDifferently()).eval()), X, 501.0)
    with pytest.raises(AssertionError, match=r"bits independent of the batch size(.|\n)*state\[rows\]"):
        testing.check_denoiser(_denoiser(Net(RoundsAloneDifferently()).eval()), X, 501.0, alone=True)
    testing.check_denoiser(testing.random_model(SD, "v", seed=1), torch.randn(3, 2, 4, 4), 741.0)
    guided = Model(CFG(lambda x, t, c: Net().eval()(x, t) + c, 3.0, c=torch.zeros(1, 8)), SD, "epsilon")
    testing.check_denoiser(guided, X, 501.0, c=torch.ones(4, 8))


# ---------------------------------------------------------------------------------------------------------------
# strategies and the reference


@settings(max_examples=25, deadline=None)
@given(pair=bst.grids(), gamma=bst.gammas(per_step=True), x=bst.latents((2, 3), torch.float16, scale=3.0))
def test_strategies_draw_valid_objects(pair, gamma, x):
    schedule, ts = pair
    times = bdia.schedules.check_grid(ts, schedule)  # float64, strictly decreasing, inside the range
    assert len(times) >= 2
    BDIA(DDIM(), gamma)  # accepted
    assert x.shape == (2, 3) and x.dtype == torch.float16


@settings(max_examples=10, deadline=None)
@given(integrator=bst.integrators(), solver=bst.solvers(), exact=bst.solvers(bitwise=True))
def test_strategies_draw_the_registry(integrator, solver, exact):
    from bdia.exact import Exact

    assert isinstance(integrator, bdia.solvers.Integrator)
    assert not isinstance(solver, bdia.solvers.Integrator | Exact) and isinstance(exact, Exact)


def test_the_rk4_reference_agrees_with_scipys():
    pytest.importorskip("scipy")
    problem = OrderProblem()
    assert float((reference(problem, "rk4") - reference(problem, "scipy")).norm(dim=-1).max()) < 1e-10
    assert RK4().order == 4 and testing.measured_order(RK4()).agrees(4)[0]
