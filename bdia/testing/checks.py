"""The contracts of an integrator, a solver and a denoiser, checked: ``check_integrator``, ``check_solver``,
``check_denoiser``.

Each runs a list of named checks (``integrator_checks``, ``solver_checks``, ``denoiser_checks`` give them, to
parametrise a test with one case per check, as scikit-learn's ``parametrize_with_checks`` does) and raises one
``AssertionError`` naming every check that failed and why. The problems they run on are small and exact where
possible: the analytic Gaussian mixture (``bdia.models.GaussianMixture``; with one unit-variance component its
denoiser is linear, and a walk's growth of a perturbation is the solver's alone), and seeded random conv nets
(``bdia.testing.RandomNet``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import textwrap
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

import bdia
from bdia.integrators import Integrator, predict
from bdia.models import CountNFE, Denoiser, GaussianMixture, Prediction
from bdia.schedules import EDM, VP, DiscreteVP, Flow, Schedule
from bdia.state import State, check_state
from bdia.testing.accuracy import OrderProblem, measured_order
from bdia.testing.networks import random_model
from bdia.testing.roundtrip import _oriented, round_trip

__all__ = [
    "Check",
    "ConstantNoise",
    "RoundTripCase",
    "check_denoiser",
    "check_integrator",
    "check_solver",
    "denoiser_checks",
    "integrator_checks",
    "solver_checks",
    "standard_round_trips",
]

AMPLIFICATION_FACTOR = 10.0  # a declared amplification must be within this factor of the measured one, either way


@dataclasses.dataclass(frozen=True)
class Check:
    """One named check of a contract: call it to run it (it raises ``AssertionError`` when the contract fails)."""

    name: str
    run: Callable[[], None]

    def __call__(self) -> None:
        self.run()

    def __repr__(self) -> str:
        return self.name


def _run_all(subject: str, checks: Sequence[Check]) -> None:
    failures = []
    for check in checks:
        try:
            check()
        except AssertionError as e:
            failures.append(f"{check.name}: {e}")
        except Exception as e:  # a crash is a failure of the contract too, named as such
            failures.append(f"{check.name}: raised {type(e).__name__}: {e}")
    if failures:
        body = "\n".join("- " + textwrap.indent(f, "  ").lstrip() for f in failures)
        raise AssertionError(f"{subject} fails {len(failures)} of {len(checks)} checks:\n{body}")


# ---------------------------------------------------------------------------------------------------------------
# the problems


_SCHEDULES: dict[str, Schedule] = {}


_MAKERS: dict[str, Callable[[], Schedule]] = {
    "sd": DiscreteVP.stable_diffusion,
    "edm": EDM,
    "flow": Flow,
    "vp": VP,
    "zsnr": lambda: DiscreteVP.from_betas("scaled_linear", rescale_zero_terminal_snr=True),
}


def _schedule(kind: str) -> Schedule:
    """The schedule of a kind, built once (so that memos keyed on it are exercised as in a real walk)."""
    if kind not in _SCHEDULES:
        _SCHEDULES[kind] = _MAKERS[kind]()
    return _SCHEDULES[kind]


_STEPS = [
    ("SD 981 -> 961", "sd", 981.0, 961.0),
    ("SD 21 -> 1", "sd", 21.0, 1.0),
    ("SD 19 -> -1 (to sigma = 0)", "sd", 19.0, -1.0),
    ("SD -1 -> 19 (from clean data)", "sd", -1.0, 19.0),
    ("SD 461 -> 481 (towards noise)", "sd", 461.0, 481.0),
    ("EDM 80 -> 57.6", "edm", 80.0, 57.6),
    ("EDM 0.5 -> 0 (to sigma = 0)", "edm", 0.5, 0.0),
    ("EDM 0 -> 0.002 (from clean data)", "edm", 0.0, 0.002),
    ("Flow 1 -> 0.9 (from pure noise)", "flow", 1.0, 0.9),
    ("Flow 0.1 -> 0 (to sigma = 0)", "flow", 0.1, 0.0),
    ("VP 1 -> 0.5", "vp", 1.0, 0.5),
    ("VP 0.2 -> 0.001", "vp", 0.2, 0.001),
]


def _steps() -> list[tuple[str, Schedule, float, float]]:
    """``(label, schedule, t, s)``: one step of each kind a walk takes, towards and away from noise, at both ends."""
    return [(label, _schedule(kind), t, s) for label, kind, t, s in _STEPS]


def _interior(schedule: Schedule, t: float, s: float) -> bool:
    """Both ends have noise and signal: every evaluation an integrator may make is at a trained time."""
    a, b = schedule.at(t), schedule.at(s)
    return min(a.alpha, a.sigma, b.alpha, b.sigma) > 0


_MIXTURES: dict[int, GaussianMixture] = {}


def _mixture(schedule: Schedule, dim: int = 8) -> GaussianMixture:
    key = id(schedule)
    if key not in _MIXTURES:
        _MIXTURES[key] = GaussianMixture.random(schedule, dim=dim, components=3, std=0.5, seed=1)
    return _MIXTURES[key]


def _latent(schedule: Schedule, t: float, batch: int = 4, dim: int = 8, seed: int = 0, dtype=torch.float64):
    k = schedule.at(t)
    z = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z * math.hypot(k.alpha, k.sigma)).to(dtype)


class ConstantNoise:
    """The linear test problem of the scaled ODE ``d(x/alpha)/d(sigma/alpha) = eps``: a denoiser whose noise
    prediction is one fixed tensor ``c`` and whose ``x0 = (x - sigma c) / alpha`` is consistent with it. DDIM is
    exact on it; a two-step solver's rounding then grows by its parasitic root alone."""

    def __init__(self, schedule: Schedule, c: torch.Tensor):
        self.schedule, self.c = schedule, c

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        k = self.schedule.at(t)
        c = self.c.to(x.dtype).expand_as(x)
        return Prediction((x - k.sigma * c) / k.alpha, c.clone())


class _Fixed:
    """A denoiser that ignores its input: the prediction is fixed (a step's arithmetic is then all that acts)."""

    def __init__(self, schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor):
        self.schedule, self.x0, self.eps = schedule, x0, eps

    def __call__(self, x: torch.Tensor, t: float, **kw: Any) -> Prediction:
        return Prediction(self.x0.to(x.dtype).expand_as(x).clone(), self.eps.to(x.dtype).expand_as(x).clone())


def _devices(devices: Sequence[str | torch.device] | None) -> list[torch.device]:
    if devices is None:
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(d) for d in devices]


def _close(a: torch.Tensor, b: torch.Tensor, scale: float, what: str, roundings: int = 64) -> None:
    """``|a - b| <= roundings u scale`` elementwise (u of a's dtype): equal up to reordered float sums."""
    u = torch.finfo(a.dtype).eps / 2
    err = float((a.double() - b.double().to(a.device)).abs().max())
    assert err <= roundings * u * scale, (
        f"{what}: they differ by {err:.3e}, past {roundings} u |x| = {roundings * u * scale:.3e}"
    )


def _order_check(solver: Any, what: str, problem: OrderProblem | None) -> None:
    declared = solver.order
    o = measured_order(solver, problem or OrderProblem())
    ok, why = o.agrees(declared)
    assert ok, (
        f"{what} declares order = {declared}, but on the analytic mixture (VP, 32-d, grids from t = 1 to 0.02) "
        f"{why}; {o}"
    )


# ---------------------------------------------------------------------------------------------------------------
# integrators


def integrator_checks(
    integrator: Integrator,
    *,
    order: bool = True,
    devices: Sequence[str | torch.device] | None = None,
    problem: OrderProblem | None = None,
) -> list[Check]:
    """The checks ``check_integrator`` runs, each a ``Check`` (see there)."""
    checks = [
        Check("declarations", lambda: _integrator_declarations(integrator)),
        Check("coefficients are a function of the times alone", lambda: _integrator_pure(integrator)),
        Check("nfe is the number of evaluations", lambda: _integrator_nfe(integrator)),
        Check("first_order is consistent", lambda: _integrator_first_order(integrator)),
        Check("dtype and device kept", lambda: _integrator_dtype_device(integrator, _devices(devices))),
        Check("batch equals a loop over samples", lambda: _integrator_batch(integrator)),
        Check("no input is modified", lambda: _integrator_no_mutation(integrator)),
        Check("non-finite values are carried", lambda: _integrator_nonfinite(integrator)),
    ]
    if order:
        checks.append(
            Check("the declared order is measured", lambda: _order_check(integrator, repr(integrator), problem))
        )
        checks.append(
            Check(
                "first_order is first order",
                lambda: _order_check(integrator.first_order, f"{integrator!r}.first_order", problem),
            )
        )
    return checks


def check_integrator(
    integrator: Integrator,
    *,
    order: bool = True,
    devices: Sequence[str | torch.device] | None = None,
    problem: OrderProblem | None = None,
) -> None:
    """Check that ``integrator`` meets the contract of ``bdia.integrators.Integrator``; raise ``AssertionError``
    naming every check that fails.

    - declarations: an ``Integrator`` instance with integer ``order`` and ``nfe`` >= 1, ``first_order`` an
      ``Integrator``, an affine one (``coefficients``) costing 1 evaluation;
    - coefficients (affine) and steps are a function of the times alone: the same numbers (bits) whatever was asked
      before, on an equal schedule built twice, and the step is ``A x + B x0 + C eps``;
    - ``nfe`` counted (``bdia.models.CountNFE``): ``nfe`` evaluations on a step between noisy times, one fewer when
      the prediction at the start is passed, at most ``nfe`` at the grid's ends;
    - ``first_order`` uses only the shared evaluation, agrees with the step to first order in the step size, and
      measures order 1;
    - dtype and device of the latent kept (float64, float32, bfloat16; CUDA when available), a fresh tensor;
    - a batch gives each sample what it gives alone; no input tensor is modified;
    - with ``nonfinite_persists`` (the default of ``Integrator``): NaN and inf in the latent reach the result;
    - ``order``: the declared order measured on the analytic mixture (``bdia.testing.accuracy.Order.agrees``: the
      errors follow ``a h^p + b h^(p+1)`` with a non-negligible first term); ``problem`` changes where
      (``order=False`` skips it).
    """
    _run_all(repr(integrator), integrator_checks(integrator, order=order, devices=devices, problem=problem))


def _integrator_declarations(integrator: Any) -> None:
    assert isinstance(integrator, Integrator), (
        f"must be an instance of bdia.integrators.Integrator (BDIA and EDICT refuse anything else), got "
        f"{type(integrator).__name__}"
    )
    for name in ("order", "nfe"):
        v = getattr(integrator, name, None)
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}"
    assert isinstance(integrator.affine, bool), f"affine must be a bool, got {integrator.affine!r}"
    assert isinstance(integrator.first_order, Integrator), (
        f"first_order must be an Integrator, got {type(integrator.first_order).__name__}"
    )
    persists = getattr(integrator, "nonfinite_persists", False)
    assert isinstance(persists, bool), f"nonfinite_persists must be a bool, got {persists!r}"
    if integrator.affine:
        assert integrator.nfe == 1, (
            f"an affine integrator (it implements coefficients) uses only the evaluation at its start: nfe must be 1, "
            f"got {integrator.nfe}"
        )


def _integrator_pure(integrator: Integrator) -> None:
    steps = _steps()
    if integrator.affine:
        first = {label: integrator.coefficients(s, t, u) for label, s, t, u in steps}
        for (label, s, t, u), (_, kind, _, _) in zip(reversed(steps), reversed(_STEPS), strict=True):
            # in another order, after every other time was asked for
            c = first[label]
            assert isinstance(c, tuple) and len(c) == 3, f"coefficients must return a tuple (A, B, C), got {c!r}"
            assert all(type(v) is float for v in c), (
                f"coefficients must be python floats (float64 time arithmetic), got {[type(v).__name__ for v in c]} "
                f"at {label}"
            )
            again = integrator.coefficients(s, t, u)
            assert again == c, f"coefficients at {label} changed between calls: {c} then {again}"
            assert integrator.coefficients(_MAKERS[kind](), t, u) == c, (
                f"coefficients at {label} differ on an equal schedule built anew: they must depend on the schedule's "
                "values, not on its identity or a memo of another"
            )
            model = _mixture(s)
            x = _latent(s, t)
            p = predict(model, x, t, u)  # (at clean data: x0 = x and the noise predicted at u)
            A, B, C = c
            want = A * x + B * p.x0 + C * p.eps
            scale = float((abs(A) * x.abs() + abs(B) * p.x0.abs() + abs(C) * p.eps.abs()).max())
            _close(integrator(model, x, t, u, p), want, scale, f"the step at {label} is not A x + B x0 + C eps", 8)
    # every integrator: the same bits for the same inputs, whatever ran in between
    results = {}
    for label, s, t, u in steps:
        model = _mixture(s)
        results[label] = integrator(model, _latent(s, t), t, u)
    for label, s, t, u in reversed(steps):
        again = integrator(_mixture(s), _latent(s, t), t, u)
        assert torch.equal(again, results[label]), (
            f"the step at {label} gave other bits the second time, after steps on other schedules and times: it must "
            "be a function of (model, x, t, s) alone (check memos keyed on anything but the schedule and the times)"
        )


def _integrator_nfe(integrator: Integrator) -> None:
    for label, s, t, u in _steps():
        counted = CountNFE(_mixture(s))
        x = _latent(s, t)
        integrator(counted, x, t, u)
        without = counted.calls
        pred = _mixture(s)(x, t) if s.at(t).sigma > 0 else None
        counted.calls = 0
        if pred is not None:
            integrator(counted, x, t, u, pred)
        with_pred = counted.calls
        if _interior(s, t, u):
            assert without == integrator.nfe, (
                f"declares nfe = {integrator.nfe} but made {without} model evaluations on the step {label}"
            )
            assert with_pred == integrator.nfe - 1, (
                f"made {with_pred} evaluations on the step {label} when given the prediction at its start (pred=): "
                f"expected nfe - 1 = {integrator.nfe - 1}; a solver that shares the evaluation (BDIA) counts on it"
            )
        else:
            assert without <= integrator.nfe, (
                f"made {without} evaluations on the step {label}, more than its nfe = {integrator.nfe}"
            )


def _integrator_first_order(integrator: Integrator) -> None:
    fo = integrator.first_order
    assert isinstance(fo, Integrator), f"first_order must be an Integrator, got {type(fo).__name__}"
    assert fo.nfe == 1, (
        f"first_order is {fo!r} with nfe = {fo.nfe}: it must be the first-order step that uses only the evaluation at "
        "the start (BDIA's default backward step shares it), nfe = 1"
    )
    assert fo.order == 1, f"first_order is {fo!r}, which declares order {fo.order}, not 1"
    s = _schedule("vp")
    model = _mixture(s)
    x = _latent(s, 0.5)
    counted = CountNFE(model)
    pred = model(x, 0.5)
    fo(counted, x, 0.5, 0.4, pred)
    assert counted.calls == 0, f"first_order {fo!r} made {counted.calls} evaluations when given the prediction"
    if fo is integrator or type(fo) is type(integrator):
        return
    # both are consistent with the ODE, so they differ by O(h^2) on a step of size h: halving h divides it by 4
    diffs = []
    for h in (0.02, 0.01, 0.005):
        a = integrator(model, x, 0.5, 0.5 - h, pred)
        b = fo(model, x, 0.5, 0.5 - h, pred)
        diffs.append(float((a - b).norm()))
    rates = [math.log2(diffs[i] / diffs[i + 1]) if diffs[i + 1] > 0 else math.inf for i in range(2)]
    assert min(rates) >= 1.5, (
        f"{integrator!r} and its first_order {fo!r} differ by {diffs} on steps of 0.02, 0.01, 0.005 (VP, t = 0.5): "
        f"the difference falls like h^{min(rates):.2f}, not h^2, so they do not solve the same ODE to first order"
    )


def _integrator_dtype_device(integrator: Integrator, devices: list[torch.device]) -> None:
    for device in devices:
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            for label, s, t, u in _steps():
                x = _latent(s, t, dtype=dtype).to(device)
                out = integrator(_mixture(s), x, t, u)
                assert isinstance(out, torch.Tensor), f"returned {type(out).__name__}, not a tensor"
                assert out.dtype == dtype, f"turned a {dtype} latent into {out.dtype} on the step {label}"
                assert out.device == x.device, f"moved a latent from {x.device} to {out.device} on the step {label}"
                assert out.shape == x.shape, f"changed the shape {tuple(x.shape)} to {tuple(out.shape)} at {label}"
                assert out.data_ptr() != x.data_ptr(), f"returned its input tensor (or a view of it) at {label}"
                assert bool(torch.isfinite(out).all()), f"a finite {dtype} latent gave NaN or inf on the step {label}"


def _integrator_batch(integrator: Integrator) -> None:
    for label, s, t, u in _steps():
        model, x = _mixture(s), _latent(s, t)
        batch = integrator(model, x, t, u)
        loop = torch.cat([integrator(model, x[i : i + 1], t, u) for i in range(x.shape[0])])
        _close(batch, loop, float(x.abs().max()) + 1.0, f"a batch and a loop over its samples at {label}")


def _integrator_no_mutation(integrator: Integrator) -> None:
    for label, s, t, u in _steps():
        model, x = _mixture(s), _latent(s, t)
        pred = model(x, t) if s.at(t).sigma > 0 else None
        kept = [x.clone()] + ([pred.x0.clone(), pred.eps.clone()] if pred is not None else [])
        integrator(model, x, t, u)
        if pred is not None:
            integrator(model, x, t, u, pred)
        now = [x] + ([pred.x0, pred.eps] if pred is not None else [])
        for name, a, b in zip(("x", "pred.x0", "pred.eps"), kept, now, strict=False):
            assert torch.equal(a, b), f"modified its input {name} in place on the step {label}"


def _integrator_nonfinite(integrator: Integrator) -> None:
    if not getattr(integrator, "nonfinite_persists", False):
        return  # nothing claimed: bdia.sample then checks every step
    for label, s, t, u in _steps():
        if not _interior(s, t, u):
            continue
        fixed = _Fixed(s, torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1, 8, dtype=torch.float64))
        for bad in (math.nan, math.inf):
            x = _latent(s, t)
            x[1, 3] = bad
            out = integrator(fixed, x, t, u)
            assert not bool(torch.isfinite(out).all()), (
                f"declares nonfinite_persists = True, but a {bad} in the latent did not reach the step {label} "
                "(with a prediction that ignores the latent): bdia.sample checks only the final state of such "
                "solvers, so the walk would not report it. Include the latent in the step (a zero coefficient still "
                "carries NaN: 0 x inf = NaN) or declare nonfinite_persists = False"
            )


# ---------------------------------------------------------------------------------------------------------------
# solvers


@dataclasses.dataclass(frozen=True)
class RoundTripCase:
    """A round trip ``check_solver`` runs: a schedule, a grid, a denoiser (built on demand), the latents' dtype."""

    name: str
    schedule: Schedule
    grid: torch.Tensor
    make_model: Callable[[], Denoiser]
    dtype: torch.dtype
    shape: tuple[int, ...]
    directions: tuple[bool, ...] = (False, True)  # from_data values: sample then invert, invert then sample

    def __repr__(self) -> str:
        return self.name


def standard_round_trips() -> list[RoundTripCase]:
    """The round trips of ``check_solver``: Stable Diffusion's, EDM's, rectified flow's and VP grids, the analytic
    mixture in float64 and seeded random conv nets in float32 (epsilon, x0, v and velocity predictions)."""
    sd, edm, flow, vp, zsnr = (_schedule(k) for k in ("sd", "edm", "flow", "vp", "zsnr"))
    return [
        RoundTripCase("SD, 12 leading steps, mixture, float64", sd, sd.timesteps(12, "leading", steps_offset=1),
                      lambda: _mixture(sd), torch.float64, (8,)),
        RoundTripCase("SD, 10 trailing steps to alpha = 1, random eps net, float32", sd,
                      sd.timesteps(10, "trailing", set_alpha_to_one=True), lambda: random_model(sd, "epsilon", seed=3),
                      torch.float32, (2, 4, 4)),
        RoundTripCase("zero terminal SNR, 8 trailing steps, random v net, float32", zsnr, zsnr.timesteps(8, "trailing"),
                      lambda: random_model(zsnr, "v", seed=4), torch.float32, (2, 4, 4)),
        RoundTripCase("EDM, 10 Karras steps, mixture, float64", edm, edm.timesteps(10), lambda: _mixture(edm),
                      torch.float64, (8,)),
        RoundTripCase("EDM, 10 Karras steps without the final 0, random x0 net, float32", edm,
                      edm.timesteps(10, final_zero=False), lambda: random_model(edm, "sample", seed=5), torch.float32,
                      (2, 4, 4), directions=(False,)),
        RoundTripCase("rectified flow, 10 steps of shift 3, random velocity net, float32", flow,
                      flow.timesteps(10, shift=3.0), lambda: random_model(flow, "velocity", seed=6), torch.float32,
                      (2, 4, 4)),
        RoundTripCase("VP, 10 steps, mixture, float32", vp, vp.timesteps(10), lambda: _mixture(vp), torch.float32,
                      (8,)),
    ]  # fmt: skip


def solver_checks(
    solver: Any,
    *,
    exact: bool | None = None,
    bitwise: bool = False,
    round_trips: Sequence[RoundTripCase] | None = None,
    order: bool = True,
    roundings: int | None = None,
    devices: Sequence[str | torch.device] | None = None,
    problem: OrderProblem | None = None,
) -> list[Check]:
    """The checks ``check_solver`` runs, each a ``Check`` (see there)."""
    exact = not isinstance(solver, Integrator) if exact is None else exact
    cases = standard_round_trips() if round_trips is None else list(round_trips)
    checks = [
        Check("declarations", lambda: _solver_declarations(solver)),
        Check("states it makes, accepts and refuses", lambda: _solver_states(solver, exact, bitwise)),
        Check("steps are pure functions of their inputs", lambda: _solver_pure(solver)),
        Check("nfe is the number of evaluations", lambda: _solver_nfe(solver, exact)),
        Check("walks are the solver's own steps", lambda: _solver_walks_are_steps(solver, exact)),
        Check("dtype and device kept, batch equals a loop", lambda: _solver_dtype_batch(solver, _devices(devices))),
        Check("non-finite values are carried", lambda: _solver_nonfinite(solver)),
    ]
    if exact:
        checks.append(
            Check("unstep inverts step (round trips)", lambda: _solver_round_trips(solver, cases, bitwise, roundings))
        )
        if not bitwise:
            checks.append(Check("the declared amplification is measured", lambda: _solver_amplification(solver)))
    if order:
        checks.append(Check("the declared order is measured", lambda: _order_check(solver, repr(solver), problem)))
    return checks


def check_solver(
    solver: Any,
    *,
    exact: bool | None = None,
    bitwise: bool = False,
    round_trips: Sequence[RoundTripCase] | None = None,
    order: bool = True,
    roundings: int | None = None,
    devices: Sequence[str | torch.device] | None = None,
    problem: OrderProblem | None = None,
) -> None:
    """Check that ``solver`` meets the solver protocol (``bdia.solvers.Solver``); raise ``AssertionError`` naming every
    check that fails.

    - declarations: integer ``nfe`` and ``order`` >= 1, the four methods, a positive finite ``amplification``;
    - states: ``init``, ``step`` and ``unstep`` return valid ``bdia.State`` values (``bdia.state.check_state``) at
      the right times, in the latent's dtype; a state of the other kind (coupled copies for a pair solver, a pair for
      a coupled one) is refused with ``ValueError`` before any model call; a state survives ``state_dict`` and
      ``state[rows]``;
    - purity: the same bits for the same state whatever ran before (other schedules), no input modified;
    - ``nfe`` evaluations per ``step`` (and per ``unstep`` for an exact solver) between noisy times;
    - dtype and device kept (CUDA when available); a batch gives each sample what it gives alone;
    - with ``nonfinite_persists``: NaN in the state reaches the next state;
    - ``exact`` (default: not a one-step ``Integrator``, whose inversion is approximate): ``assert_round_trip`` both
      ways over ``round_trips`` (default ``standard_round_trips()``; a walk the solver refuses with ``ValueError`` is
      skipped), ``bitwise`` for a fixed-point solver (``bdia.exact.Exact``), ``roundings`` the rounding model's
      ``c``; and ``amplification`` against the growth of one rounding error measured on unit-variance Gaussian data
      (a linear denoiser: the solver, gamma and the grid are all that amplify), within a factor of 10 either way;
    - ``order``: the declared order measured on the analytic mixture (as ``check_integrator``).
    """
    checks = solver_checks(
        solver,
        exact=exact,
        bitwise=bitwise,
        round_trips=round_trips,
        order=order,
        roundings=roundings,
        devices=devices,
        problem=problem,
    )
    _run_all(repr(solver), checks)


_SOLVER_METHODS = ("init", "step", "unstep", "amplification")


def _solver_declarations(solver: Any) -> None:
    assert not isinstance(solver, type), f"pass an instance, not the class {solver.__name__}"
    for name in ("nfe", "order"):
        v = getattr(solver, name, None)
        assert isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1, got {v!r}"
    missing = [m for m in _SOLVER_METHODS if not callable(getattr(solver, m, None))]
    assert not missing, f"missing the solver method(s) {missing} (bdia.solvers.Solver)"
    persists = getattr(solver, "nonfinite_persists", False)
    assert isinstance(persists, bool), f"nonfinite_persists must be a bool, got {persists!r}"
    s = _schedule("sd")
    times = s.timesteps(10, "leading", steps_offset=1).tolist()
    for forward in (True, False):
        a = solver.amplification(s, times, forward)
        assert isinstance(a, int | float) and not isinstance(a, bool), f"amplification must be a float, got {a!r}"
        assert math.isfinite(a) and a > 0, f"amplification({'sampling' if forward else 'inverting'}) = {a}"


def _walk_states(solver: Any, model: Denoiser, x: torch.Tensor, times: list[float]) -> list[State]:
    """``init`` and then ``step`` along ``times``: the states of a sampling walk (sampling orientation)."""
    states = [solver.init(model, x, times[0], times[1])]
    start = 1 if states[0].coupled else 2  # EDICT's init takes no step; BDIA's takes the first
    for t in times[start:]:
        states.append(solver.step(model, states[-1], t))
    return states


def _solver_states(solver: Any, exact: bool, bitwise: bool) -> None:
    s = _schedule("sd")
    times = s.timesteps(8, "leading", steps_offset=1).tolist()
    model = _mixture(s)
    x = _latent(s, times[0], dtype=torch.float32)
    states = _walk_states(solver, model, x, times)
    for i, st in enumerate(states):
        check_state(st, f"state {i} of the walk")
        assert st.x.dtype == x.dtype, f"state {i} holds {st.x.dtype} latents, the walk started from {x.dtype}"
    first = states[0]
    assert first.t in (times[0], times[1]), f"init from t = {times[0]} towards {times[1]} returned a state at {first.t}"
    if not first.coupled:
        assert (first.t_prev, first.t) == (times[0], times[1]), (
            f"init made the pair at times ({first.t_prev}, {first.t}), expected ({times[0]}, {times[1]})"
        )
        if not bitwise:  # (a fixed-point solver holds the latent rounded to its grid)
            assert torch.equal(first.x_prev, x), "init's pair must hold the starting latent itself as x_prev"
    mid = states[len(states) // 2]
    ahead = solver.step(model, mid, times[times.index(mid.t) + 1])
    if exact:
        back = solver.unstep(model, ahead, mid.t_prev)
        assert (back.t_prev, back.t) == (mid.t_prev, mid.t), (
            f"unstep of a state at ({ahead.t_prev}, {ahead.t}) towards {mid.t_prev} returned times "
            f"({back.t_prev}, {back.t}), expected ({mid.t_prev}, {mid.t})"
        )
        if not mid.coupled:
            assert torch.equal(back.x, mid.x), "unstep must pass the shared latent of the pair through untouched"
    # a saved and loaded state, or a selection of its rows, continues the same
    loaded = State.from_state_dict(mid.state_dict())
    assert torch.equal(solver.step(model, loaded, ahead.t).x, ahead.x), (
        "a state rebuilt from state_dict() continues differently from the original"
    )
    rows = solver.step(model, mid[1:3], ahead.t)
    _close(rows.x, ahead.x[1:3], float(ahead.x.abs().max()), "state[1:3] stepped against the batch's rows 1:3")
    # a state of the other kind is refused before any model call
    other = (
        State(mid.x, mid.x, mid.t, mid.t, coupled=True)
        if not mid.coupled
        else State(mid.x_prev, mid.x, times[0], times[1])
    )
    counted = CountNFE(model)
    moves = [("step", solver.step, ahead.t)] + ([("unstep", solver.unstep, times[0])] if exact else [])
    for name, move, t in moves:
        try:
            move(counted, other, t)
        except ValueError:
            pass
        else:
            raise AssertionError(
                f"{name} accepted {'coupled copies' if other.coupled else 'a pair of consecutive points'} though its "
                f"walks make {'pairs' if other.coupled else 'coupled copies'}: continuing another solver's state is "
                "silently wrong; raise ValueError"
            )
        assert counted.calls == 0, f"{name} called the model {counted.calls} times before refusing the other kind"


def _solver_pure(solver: Any) -> None:
    results = {}
    for kind in ("sd", "edm", "vp"):
        s = _schedule(kind)
        times = (s.timesteps(8, "leading", steps_offset=1) if kind == "sd" else s.timesteps(8)).tolist()
        model = _mixture(s)
        x = _latent(s, times[0])
        states = _walk_states(solver, model, x, times[:5])
        kept = [(st.x.clone(), st.x_prev.clone()) for st in states]
        results[kind] = (model, states, solver.step(model, states[-2], states[-1].t).x)
        for st, (a, b) in zip(states, kept, strict=True):
            assert torch.equal(st.x, a) and torch.equal(st.x_prev, b), "a step modified a state it was given in place"
    for kind, (model, states, first) in results.items():
        again = solver.step(model, states[-2], states[-1].t).x
        assert torch.equal(again, first), (
            f"step gave other bits for the same state on the {kind} schedule after walks on other schedules: it must "
            "be a function of (model, state, time) alone (check memos keyed on anything but the schedule and times)"
        )


def _solver_nfe(solver: Any, exact: bool) -> None:
    s = _schedule("sd")
    times = s.timesteps(10, "leading", steps_offset=1).tolist()
    counted = CountNFE(_mixture(s))
    states = _walk_states(solver, counted, _latent(s, times[0]), times[:6])
    mid = states[-2]
    counted.calls = 0
    ahead = solver.step(counted, mid, states[-1].t)
    assert counted.calls == solver.nfe, f"declares nfe = {solver.nfe}, but a step made {counted.calls} evaluations"
    if exact:
        counted.calls = 0
        solver.unstep(counted, ahead, mid.t_prev if not mid.coupled else mid.t)
        assert counted.calls == solver.nfe, (
            f"declares nfe = {solver.nfe}, but an unstep made {counted.calls} evaluations"
        )


def _solver_walks_are_steps(solver: Any, exact: bool) -> None:
    """``bdia.sample`` and ``bdia.invert`` run a solver's ``plan`` where it has one (BDIA precomputes its steps):
    each state they make must be the solver's own ``step`` (``unstep``) of the one before, to the bit."""
    s = _schedule("sd")
    ts = s.timesteps(8, "leading", steps_offset=1)
    model = _mixture(s)
    x = _latent(s, float(ts[0]), dtype=torch.float32)
    walks = [(bdia.sample, solver.step, True)] + ([(bdia.invert, solver.unstep, False)] if exact else [])
    start = x
    for walk, move, forward in walks:
        seen: list[State] = []
        out = walk(model, start, ts, solver, callback=lambda st, seen=seen: seen.append(_oriented(st.state)))
        for before, after in itertools.pairwise(seen):
            mine = move(model, before, after.t if forward or after.coupled else after.t_prev)
            same = torch.equal(mine.x, after.x) and torch.equal(mine.x_prev, after.x_prev)
            assert same, (
                f"bdia.{walk.__name__}'s walk and the solver's own {move.__name__} disagree at the state at times "
                f"({after.t_prev}, {after.t}): the walk runs the solver's plan (solver.plan), so a subclass that "
                f"overrides {move.__name__} must override plan too (or return bdia.protocols.Stepping from it)"
            )
        start = out


def _solver_dtype_batch(solver: Any, devices: list[torch.device]) -> None:
    s = _schedule("sd")
    times = s.timesteps(6, "leading", steps_offset=1).tolist()
    model = _mixture(s)
    for device in devices:
        for dtype in (torch.float64, torch.float32):
            x = _latent(s, times[0], dtype=dtype).to(device)
            last = _walk_states(solver, model, x, times)[-1]
            for name in ("x", "x_prev"):
                v = getattr(last, name)
                assert v.dtype == dtype and v.device == x.device, (
                    f"a walk from a {dtype} latent on {x.device} ended with {name} in {v.dtype} on {v.device}"
                )
    x = _latent(s, times[0])
    batch = _walk_states(solver, model, x, times)[-1].x
    loop = torch.cat([_walk_states(solver, model, x[i : i + 1], times)[-1].x for i in range(x.shape[0])])
    _close(batch, loop, float(batch.abs().max()) + 1.0, "a batch and a loop over its samples, after 5 steps", 256)


def _solver_nonfinite(solver: Any) -> None:
    if not getattr(solver, "nonfinite_persists", False):
        return
    s = _schedule("sd")
    times = s.timesteps(8, "leading", steps_offset=1).tolist()
    model = _mixture(s)
    states = _walk_states(solver, model, _latent(s, times[0]), times[:4])
    mid = states[-1]
    for bad in (math.nan, math.inf):
        x = mid.x.clone()
        x[2, 5] = bad
        poisoned = mid.replace(x=x)
        state = poisoned
        for t in times[4:]:
            state = solver.step(model, state, t)
        newest = [state.x, state.x_prev] if state.coupled else [state.x]
        assert not all(bool(torch.isfinite(v).all()) for v in newest), (
            f"declares nonfinite_persists = True, but a {bad} in the state did not reach the state four steps later: "
            "bdia.sample checks only the final state of such solvers, so the walk would not report it"
        )


def _solver_round_trips(solver: Any, cases: Sequence[RoundTripCase], bitwise: bool, roundings: int) -> None:
    failures, ran = [], 0
    for case in cases:
        model = case.make_model()
        times = case.grid.tolist()
        k = case.schedule.at(times[0])
        g = torch.Generator().manual_seed(7)
        noise = torch.randn((2, *case.shape), generator=g, dtype=torch.float64) * math.hypot(k.alpha, k.sigma)
        if isinstance(model, GaussianMixture):
            data = model.sample(2, generator=g).reshape(2, *case.shape)
        else:
            data = torch.randn((2, *case.shape), generator=g, dtype=torch.float64)
        for from_data in case.directions:
            start = (data if from_data else noise).to(case.dtype)
            try:
                r = round_trip(
                    model, start, case.grid, solver, from_data=from_data, bitwise=bitwise, roundings=roundings
                )
            except ValueError:
                continue  # the solver (or the walk) refuses this walk before running it: not a claim
            except Exception as e:
                way = "invert, then sample" if from_data else "sample, then invert"
                failures.append(f"{case.name} ({way}): raised {type(e).__name__}: {e} (refuse a walk with ValueError)")
                continue
            if not r.ok:
                failures.append(f"{case.name}:\n{textwrap.indent(str(r), '  ')}")
            elif r.checkable:  # (a bound past the data's scale cannot show anything: not counted as checked)
                ran += 1
    assert ran > 0 or failures, (
        "no round trip was checked: each was refused (ValueError) or had a bound too wide to fail (the solver "
        "amplifies rounding past the data's scale on these walks); pass round_trips= it can be checked on"
    )
    assert not failures, "\n".join(failures)


def _typical(schedule: Schedule, t: float) -> float:
    k = schedule.at(t)
    return math.hypot(k.alpha, k.sigma)


def _coupled_walk(r: Any) -> bool:
    return all(tp == t for tp, t in r.times)


def _solver_amplification(solver: Any) -> None:
    """On unit-variance Gaussian data, whose exact denoiser is linear (``x0 = alpha x / (alpha^2 + sigma^2)``: a
    walk's growth of a perturbation does not depend on its states), the growth of one rounding error from the point
    of the walk that made it to the result, ``max_k w_k G_k`` with ``w_k`` the typical size of a latent there
    relative to the result's (``sqrt(alpha^2 + sigma^2)``), measured by carrying a perturbation through the walk
    (``round_trip(..., growth=True)``): the declared amplification must be within ``AMPLIFICATION_FACTOR`` of it
    either way (a smaller declaration lets ``bdia.sample`` run walks whose rounding blows up, a much larger one
    refuses walks that would work)."""
    problems, checked = [], 0
    walks = [
        ("SD, 20 leading steps", _schedule("sd"), _schedule("sd").timesteps(20, "leading", steps_offset=1)),
        (
            "SD, 20 trailing steps to alpha = 1",
            _schedule("sd"),
            _schedule("sd").timesteps(20, "trailing", set_alpha_to_one=True),
        ),
        ("EDM, 12 Karras steps", _schedule("edm"), _schedule("edm").timesteps(12, final_zero=False)),
        ("EDM, 40 Karras steps", _schedule("edm"), _schedule("edm").timesteps(40, final_zero=False)),
    ]
    for name, s, ts in walks:
        times = ts.tolist()
        model = GaussianMixture(s, torch.zeros(1, 8, dtype=torch.float64), 1.0)
        for from_data in (False, True):
            x = _latent(s, times[-1] if from_data else times[0], batch=2, seed=int(from_data))
            try:
                declared = float(solver.amplification(s, times, from_data))
                r = round_trip(model, x, ts, solver, from_data=from_data, growth=True, max_amplification=math.inf)
            except ValueError:
                continue  # a walk the solver refuses
            checked += 1
            newest = [t if from_data or _coupled_walk(r) else tp for tp, t in r.times]  # the latent each point made
            w = torch.tensor([_typical(s, t) for t in newest], dtype=torch.float64) / _typical(s, newest[-1])
            measured = max(1.0, float((w[:, None] * r.growths).max()))
            walk = f"{'sampling' if from_data else 'inverting'} {name}"
            if measured > AMPLIFICATION_FACTOR * declared:
                problems.append(f"declares {declared:.3g} for {walk}, but one rounding grows {measured:.3g}x")
            elif declared > AMPLIFICATION_FACTOR * measured:
                problems.append(f"declares {declared:.3g} for {walk}, but one rounding grows only {measured:.3g}x")
    assert checked, "refused every walk of the check (ValueError)"
    assert not problems, (
        "amplification(schedule, times, forward) must estimate how much the walk grows one rounding error, relative to "
        f"the latents (within a factor of {AMPLIFICATION_FACTOR:g}), measured on unit-variance Gaussian data (a linear "
        "denoiser: nothing but the solver, the grid and gamma amplify): " + "; ".join(problems)
    )


# ---------------------------------------------------------------------------------------------------------------
# denoisers


def denoiser_checks(
    model: Denoiser, x: torch.Tensor, t: float, *, alone: bool = False, **conditioning: Any
) -> list[Check]:
    """The checks ``check_denoiser`` runs, each a ``Check`` (see there)."""
    kept = x.clone()  # each check runs on its own copy: a denoiser that edits its input cannot hide it
    checks = [
        Check("declarations and output", lambda: _denoiser_output(model, kept.clone(), t, conditioning)),
        Check("modules in eval mode", lambda: _denoiser_modes(model)),
        Check("the same bits for the same input", lambda: _denoiser_reproducible(model, kept.clone(), t, conditioning)),
        Check("a function of (x, t) alone", lambda: _denoiser_pure(model, kept.clone(), t, conditioning)),
        Check("no input is modified", lambda: _denoiser_no_mutation(model, kept, t, conditioning)),
        Check(
            "bits independent of the rest of the batch", lambda: _denoiser_batch(model, kept.clone(), t, conditioning)
        ),
    ]
    if alone:
        checks.append(
            Check("bits independent of the batch size", lambda: _denoiser_alone(model, kept.clone(), t, conditioning))
        )
    return checks


def check_denoiser(model: Denoiser, x: torch.Tensor, t: float, *, alone: bool = False, **conditioning: Any) -> None:
    """Check that ``model`` gives what exact inversion needs, at the latent ``x`` (a batch of at least 2) and time
    ``t``; raise ``AssertionError`` naming every failure and its cause.

    Exact inversion recomputes every evaluation of the walk it inverts and needs the same bits back (``Exact`` to
    the bit; a float solver's round trip otherwise takes on the evaluation's own rounding at every step). The check
    calls ``model(x, t, **conditioning)`` again and again and names what breaks it:

    - a ``schedule`` and a ``Prediction`` of ``x``'s shape, dtype and device, finite for a finite ``x``;
    - every ``torch.nn.Module`` reachable from the denoiser in ``eval()`` mode (dropout or batch norm left in
      training mode: a module built from a config starts in training mode, a T5 keeps its dropout on);
    - the same bits twice in a row: if not, whether the difference is rounding-sized (non-deterministic kernels:
      run under ``torch.use_deterministic_algorithms(True)``) or larger (random sampling inside the network);
    - an output that depends on ``t`` and is the same after calls at other times and batch sizes (no stale cache);
      the input not modified;
    - each sample's bits independent of the rest of its batch: in the reverse order, and next to other latents in
      a batch twice the size, as classifier-free guidance batches ``[uncond; cond]`` (``bdia.models.CFG``), which a
      pipeline may skip in one direction (guidance scale 1) and not the other;
    - ``alone=True``: also evaluated one sample at a time (batch 1), which inverting a selection of a batch
      (``state[rows]``) needs; CPU float32 kernels often round a batch of 1 differently (a matrix-vector product
      instead of a matrix product), so this is only asked for.
    """
    _run_all(f"denoiser {type(model).__name__}", denoiser_checks(model, x, t, alone=alone, **conditioning))


def _modules(root: Any, limit: int = 4) -> list[tuple[str, torch.nn.Module]]:
    """Every ``nn.Module`` reachable from ``root`` through attributes (a few levels deep), with its path."""
    out: list[tuple[str, torch.nn.Module]] = []
    seen: set[int] = set()

    def visit(obj: Any, path: str, depth: int) -> None:
        if id(obj) in seen or depth > limit:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            out.append((path, obj))
            return  # (its submodules are reached through .modules())
        if isinstance(obj, dict):
            items: Iterable[tuple[str, Any]] = ((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif hasattr(obj, "__dict__") and not isinstance(obj, type | torch.Tensor | Schedule):
            items = ((f"{path}.{k}", v) for k, v in vars(obj).items())
        else:
            return
        for p, v in items:
            visit(v, p, depth + 1)

    visit(root, "model", 0)
    return out


def _training(model: Any) -> list[str]:
    names = []
    for path, module in _modules(model):
        for sub, m in module.named_modules():
            if m.training:
                where = f"{path}.{sub}" if sub else path
                names.append(f"{where} ({type(m).__name__})")
    return names


def _call(model: Denoiser, x: torch.Tensor, t: float, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        p = model(x, t, **kw)
    return p.x0, p.eps


def _denoiser_output(model: Any, x: torch.Tensor, t: float, kw: dict) -> None:
    from bdia.schedules import Schedule as _S

    assert isinstance(getattr(model, "schedule", None), _S), "a denoiser needs a bdia.schedules.Schedule as .schedule"
    assert isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] >= 2, (
        "check_denoiser needs a latent batch of at least 2 samples (to check batch independence)"
    )
    p = model(x, t, **kw)
    assert isinstance(p, Prediction), f"must return a bdia.Prediction, got {type(p).__name__}"
    for name, v in (("x0", p.x0), ("eps", p.eps)):
        assert v.shape == x.shape and v.dtype == x.dtype and v.device == x.device, (
            f"prediction {name} is {tuple(v.shape)} {v.dtype} on {v.device}, the latent {tuple(x.shape)} {x.dtype} "
            f"on {x.device}"
        )
        if bool(torch.isfinite(x).all()):
            assert bool(torch.isfinite(v).all()), f"prediction {name} is not finite for a finite latent at t = {t}"


def _denoiser_modes(model: Any) -> None:
    training = _training(model)
    assert not training, (
        f"{len(training)} module(s) in training mode, e.g. {', '.join(training[:4])}: dropout samples new masks and "
        "batch norm uses (and updates) batch statistics at every call, so no walk can be inverted exactly; call "
        ".eval() on the network (a module built from a config starts in training mode)"
    )


def _difference(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    """The largest difference and the largest magnitude, over both tensors of a prediction."""
    diff = max(float((u.double() - v.double()).abs().max()) for u, v in zip(a, b, strict=True))
    size = max(float(u.double().abs().max()) for u in a)
    return diff, size


def _denoiser_reproducible(model: Denoiser, x: torch.Tensor, t: float, kw: dict) -> None:
    first = _call(model, x, t, kw)
    for _ in range(3):
        again = _call(model, x, t, kw)
        if all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
            continue
        diff, size = _difference(first, again)
        u = torch.finfo(x.dtype).eps / 2
        training = _training(model)
        if training:
            cause = (
                f"module(s) in training mode ({', '.join(training[:3])}): dropout left on; call .eval() on the network"
            )
        elif diff <= 1e3 * u * max(size, 1e-30):
            cause = (
                "non-deterministic kernels (the difference is rounding-sized: atomics or reduction order, as cuDNN and "
                "cuBLAS choose on GPU): run the walks under torch.use_deterministic_algorithms(True) (with "
                "CUBLAS_WORKSPACE_CONFIG=:4096:8), e.g. bdia.exact.Exact(..., deterministic=True)"
            )
        else:
            cause = (
                "random sampling inside the network (the difference is far larger than rounding: noise, dropout "
                "through torch.nn.functional with training=True, a random mask)"
            )
        raise AssertionError(
            f"two calls with the same input at t = {t} gave different outputs (largest difference {diff:.3e} on "
            f"values up to {size:.3e}): {cause}"
        )


def _denoiser_pure(model: Denoiser, x: torch.Tensor, t: float, kw: dict) -> None:
    first = _call(model, x, t, kw)
    k = model.schedule
    other = k.t_min + 0.37 * (k.t_max - k.t_min)
    if isinstance(k, DiscreteVP):
        other = float(round(other))
    elsewhere = _call(model, x, other, kw)
    _call(model, x[:1], t, _rows(kw, slice(0, 1), x.shape[0]))
    again = _call(model, x, t, kw)
    if not all(torch.equal(a, b) for a, b in zip(first, again, strict=True)):
        diff, size = _difference(first, again)
        raise AssertionError(
            f"the output at t = {t} changed (by {diff:.3e} on values up to {size:.3e}) after calls at t = {other} and "
            "with a batch of 1: the denoiser keeps state between calls (a cache keyed on less than the time, the "
            "batch size, dtype and device?)"
        )
    assert not all(torch.equal(a, b) for a, b in zip(first, elsewhere, strict=True)), (
        f"the output at t = {other} is the output at t = {t}: the denoiser ignores the time, or keeps state between "
        "calls and returned a stale one"
    )


def _denoiser_no_mutation(model: Denoiser, kept: torch.Tensor, t: float, kw: dict) -> None:
    x = kept.clone()
    _call(model, x, t, kw)
    assert torch.equal(x, kept), "the denoiser modified its input latent in place"


def _rows(kw: dict, rows: Any, batch: int) -> dict:
    """The conditioning of a selection of the batch (tensors with the batch's leading dimension are indexed)."""

    def pick(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
            return v[rows]
        if isinstance(v, dict):
            return {k: pick(w) for k, w in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(pick(w) for w in v)
        return v

    return {k: pick(v) for k, v in kw.items()}


def _denoiser_batch(model: Denoiser, x: torch.Tensor, t: float, kw: dict) -> None:
    B = x.shape[0]
    full = _call(model, x, t, kw)
    problems = []
    rev = torch.arange(B - 1, -1, -1)
    back = _call(model, x[rev], t, _rows(kw, rev, B))
    if not all(torch.equal(a[rev], b) for a, b in zip(full, back, strict=True)):
        problems.append("evaluated in the reverse order")
    others = torch.randn(x.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(x)
    others = others * x.double().std().to(x.dtype)
    both = _call(model, torch.cat([x, others]), t, {k: _twice(v, B) for k, v in kw.items()})
    if not all(torch.equal(a, b[:B]) for a, b in zip(full, both, strict=True)):
        problems.append(
            "next to other latents in a batch twice the size, as classifier-free guidance batches [uncond; cond]"
        )
    if problems:
        raise AssertionError(
            "a sample's output depends on the rest of its batch: its bits differ when "
            + "; when ".join(problems)
            + ". Exact inversion recomputes each evaluation and needs the same bits: sample and invert with the same "
            "batches (the same guidance batching in both directions), or make the network's bits batch-independent "
            "(no batch statistics, no attention or normalisation across samples)"
        )


def _denoiser_alone(model: Denoiser, x: torch.Tensor, t: float, kw: dict) -> None:
    B = x.shape[0]
    full = _call(model, x, t, kw)
    alone = [_call(model, x[i : i + 1], t, _rows(kw, slice(i, i + 1), B)) for i in range(B)]
    stacked = tuple(torch.cat([a[j] for a in alone]) for j in range(2))
    if not all(torch.equal(a, b) for a, b in zip(full, stacked, strict=True)):
        diff, size = _difference(full, stacked)
        raise AssertionError(
            f"each sample evaluated alone (batch 1) differs from its row of the batch (by {diff:.3e} on values up to "
            f"{size:.3e}): inverting a selection of a batch (state[rows]) is then exact only to the evaluation's "
            "rounding, not to the bit; invert the batch the walk sampled"
        )


def _twice(v: Any, batch: int) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
        return torch.cat([v, v])
    if isinstance(v, dict):
        return {k: _twice(w, batch) for k, w in v.items()}
    if isinstance(v, list | tuple):
        return type(v)(_twice(w, batch) for w in v)
    return v
