"""Bad input gets a clear error that names the argument and what was expected; nothing is silently coerced."""

from __future__ import annotations

import math

import pytest
import torch

import bdia
from bdia.models import CFG, GaussianMixture, Model
from bdia.schedules import EDM, VP, DiscreteVP, Flow, check_grid
from bdia.solvers import BDIA, DDIM, Euler, Heun
from bdia.state import State
from tests.conftest import model_for, schedule

SD_TS = DiscreteVP.stable_diffusion().timesteps(10, "leading", steps_offset=1)


@pytest.fixture
def gmm():
    return model_for("sd", None)


@pytest.mark.parametrize(
    ("ts", "error", "match"),
    [
        (torch.tensor([981.0, 1.0, 0.0]), TypeError, "float64"),
        ([981.0, 0.0], TypeError, "torch.Tensor"),
        (torch.tensor([981.0], dtype=torch.float64), ValueError, "at least 2"),
        (torch.tensor([[981.0, 0.0]], dtype=torch.float64), ValueError, "1-D"),
        (torch.tensor([981.0, 501.0, 701.0, 0.0], dtype=torch.float64), ValueError, "strictly decreasing"),
        (torch.tensor([0.0, 981.0], dtype=torch.float64), ValueError, "strictly decreasing"),
        (torch.tensor([981.0, 981.0, 0.0], dtype=torch.float64), ValueError, "strictly decreasing"),
        (torch.tensor([1500.0, 0.0], dtype=torch.float64), ValueError, "outside"),
        (torch.tensor([981.0, math.nan], dtype=torch.float64), ValueError, "non-finite"),
    ],
)
def test_bad_grids(gmm, ts, error, match):
    with pytest.raises(error, match=match):
        bdia.sample(gmm, torch.zeros(1, 8), ts, BDIA())
    with pytest.raises(error, match=match):
        check_grid(ts, gmm.schedule)


@pytest.mark.parametrize("gamma", [1.5, -0.1, math.nan])
def test_gamma_out_of_range(gamma):
    with pytest.raises(ValueError, match="gamma must lie in"):
        BDIA(DDIM(), gamma)


@pytest.mark.parametrize("gamma", [True, "0.5", None])
def test_gamma_of_the_wrong_type(gamma):
    with pytest.raises(TypeError, match="gamma must be"):
        BDIA(DDIM(), gamma)


def test_gamma_tensor_checks(gmm):
    with pytest.raises(ValueError, match="1-D floating point"):
        BDIA(DDIM(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="gamma must lie in"):
        BDIA(DDIM(), torch.tensor([0.5, 1.2]))
    with pytest.raises(ValueError, match="gamma has 2 entries but the batch has 3"):
        bdia.sample(gmm, torch.zeros(3, 8), SD_TS, BDIA(DDIM(), torch.tensor([0.5, 1.0])))


def test_per_step_gamma_must_be_finite_and_non_negative(gmm):
    with pytest.raises(ValueError, match="expected a finite number >= 0"):
        bdia.sample(gmm, torch.zeros(1, 8), SD_TS, BDIA(DDIM(), lambda s, tp, t, tn: -1.0))
    with pytest.raises(ValueError, match="expected a finite number >= 0"):
        bdia.sample(gmm, torch.zeros(1, 8), SD_TS, BDIA(DDIM(), lambda s, tp, t, tn: math.inf))


def test_inverting_with_gamma_zero_is_an_error(gmm):
    out = bdia.sample(gmm, torch.zeros(2, 8), SD_TS, BDIA(DDIM(), 0.0))  # sampling with gamma = 0 is DDIM
    with pytest.raises(ValueError, match="gamma = 0 .* cannot be inverted"):
        bdia.invert(gmm, out, SD_TS, BDIA(DDIM(), 0.0))
    with pytest.raises(ValueError, match="cannot be inverted"):
        bdia.invert(gmm, out, SD_TS, BDIA(DDIM(), torch.tensor([1.0, 0.0])))
    with pytest.raises(ValueError, match="cannot be inverted"):
        bdia.invert(gmm, out, SD_TS, BDIA(DDIM(), lambda s, tp, t, tn: 0.0))


def test_bad_solver_parts():
    with pytest.raises(TypeError, match="integrator must be"):
        BDIA("ddim")
    with pytest.raises(TypeError, match="backward must be"):
        BDIA(DDIM(), backward=lambda *a: None)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        (State(torch.zeros(2, 8), torch.zeros(3, 8), 901.0, 801.0), "share shape"),
        (State(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8), 901.0, 801.0), "share dtype"),
        (State(torch.zeros(2, 8, device="meta"), torch.zeros(2, 8), 901.0, 801.0), "share device"),
        (State(torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int64), 901.0, 801.0), "floating"),
        (State(torch.zeros(2, 8), torch.zeros(2, 8), 901, 801.0), "python float"),
    ],
)
def test_mismatched_states(gmm, state, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bdia.sample(gmm, state, SD_TS, BDIA())


def test_a_state_from_another_grid_is_refused(gmm):
    out = bdia.sample(gmm, torch.zeros(2, 8), SD_TS, BDIA())
    other = DiscreteVP.stable_diffusion().timesteps(20, "leading", steps_offset=1)
    with pytest.raises(ValueError, match="do not continue this grid"):
        bdia.invert(gmm, out, other[:-2], BDIA())
    with pytest.raises(ValueError, match="do not continue this grid"):
        bdia.sample(gmm, out, SD_TS, BDIA())  # a finished sample does not start this grid again


def test_bad_latents(gmm):
    with pytest.raises(TypeError, match="floating-point"):
        bdia.sample(gmm, torch.zeros(2, 8, dtype=torch.int32), SD_TS, BDIA())
    with pytest.raises(TypeError, match="torch.Tensor or a bdia.State"):
        bdia.sample(gmm, [0.0] * 8, SD_TS, BDIA())
    with pytest.raises(ValueError, match="batch dimension"):
        bdia.sample(gmm, torch.tensor(0.0), SD_TS, BDIA())


def test_model_errors():
    s = schedule("sd")
    with pytest.raises(ValueError, match="unknown prediction='eps'"):
        Model(lambda x, t: x, s, prediction="eps")
    with pytest.raises(TypeError, match="schedule must be"):
        Model(lambda x, t: x, "sd")
    with pytest.raises(TypeError, match="net must be callable"):
        Model(None, s)
    with pytest.raises(ValueError, match="shaped like x"):
        Model(lambda x, t: x[:, :2], s)(torch.zeros(2, 4), 10.0)
    with pytest.raises(TypeError, match="dtype"):
        Model(lambda x, t: x.double(), s)(torch.zeros(2, 4), 10.0)


def test_prediction_errors():
    """A denoiser's Prediction takes tensors (term lists are Prediction.affine's business)."""
    from bdia.models import Prediction

    with pytest.raises(TypeError, match=r"Prediction.x0 must be a tensor, got list"):
        Prediction([(1.0, torch.zeros(2))], torch.zeros(2))
    with pytest.raises(TypeError, match=r"Prediction.eps must be a tensor, got float"):
        Prediction(torch.zeros(2), 0.0)


def test_cfg_errors():
    net = lambda x, t, c: x  # noqa: E731
    with pytest.raises(ValueError, match="same conditioning keywords"):
        CFG(net, 2.0, c=torch.zeros(1))(torch.zeros(2, 3), torch.zeros(2), d=torch.zeros(2))
    with pytest.raises(ValueError, match="batch 3, expected 1 or 2"):
        CFG(net, 2.0, c=torch.zeros(3))(torch.zeros(2, 3), torch.zeros(2), c=torch.zeros(2))


def test_nan_produced_is_reported_with_its_step():
    s = schedule("sd")

    def net(x, t):
        return torch.full_like(x, math.nan) if float(t[0]) < 500 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"in step 6 of 10 \(t = 401.0 -> 301.0\)"):
        bdia.sample(Model(net, s), torch.zeros(2, 4), SD_TS, BDIA())
    with pytest.raises(FloatingPointError, match="in the input"):
        bdia.sample(model_for("sd", None), torch.full((2, 8), math.nan), SD_TS, BDIA())


def test_nan_produced_while_inverting_is_reported_with_its_step():
    """Inversion rebuilds x_prev at every step: that is the latent the check must read."""
    s = schedule("sd")

    def net(x, t):
        return torch.full_like(x, math.nan) if float(t[0]) > 500 else torch.zeros_like(x)

    with pytest.raises(FloatingPointError, match=r"in step 7 of 10 \(t = 501.0 -> 601.0\)"):
        bdia.invert(Model(net, s), torch.zeros(2, 4), SD_TS, BDIA())
    with pytest.raises(FloatingPointError, match=r"in step 7 of 10 \(t = 501.0 -> 601.0\)"):
        bdia.invert(Model(net, s), torch.zeros(2, 4), SD_TS, DDIM())


def test_overflow_in_the_first_step_is_reported_as_that_step():
    """cosine betas at t = 999 (alpha = 4.9e-5), an epsilon model answering 6e4, float16: x0 is out of range."""
    s = schedule("cosine")
    model = Model(lambda x, t: torch.full_like(x, 6e4), s, "epsilon")
    ts = torch.tensor([999.0, 0.0, -1.0], dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"in step 1 of 2 \(t = 999.0 -> 0.0\)"):
        bdia.sample(model, torch.ones(3, 8, dtype=torch.float16), ts, BDIA(Euler()))


def test_epsilon_model_where_alpha_is_zero_is_reported():
    """Zero terminal SNR: x0 is undefined for an epsilon model at the first time: not silently garbage."""
    s = schedule("zsnr")
    model = Model(lambda x, t: torch.zeros_like(x), s, "epsilon")
    with pytest.raises(FloatingPointError, match="alpha = 0"):
        bdia.sample(model, torch.randn(2, 4), s.timesteps(10, "trailing"), BDIA())


def test_schedule_errors():
    with pytest.raises(ValueError, match="unknown beta schedule kind='cosine'"):
        DiscreteVP.from_betas("cosine")
    with pytest.raises(ValueError, match="unknown spacing='uniform'"):
        schedule("sd").timesteps(10, "uniform")
    with pytest.raises(ValueError, match="n must be an int"):
        schedule("sd").timesteps(0)
    with pytest.raises(ValueError, match="n must be an int"):
        schedule("sd").timesteps(1001)
    with pytest.raises(ValueError, match="outside"):
        schedule("sd").at(1000.0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP([0.5, 0.9])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        DiscreteVP([1.5, 0.9])
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VP(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="sigma_min"):
        EDM().timesteps(10, sigma_min=100.0)
    with pytest.raises(ValueError, match="shift must be finite and > 0"):
        Flow().timesteps(10, shift=0.0)
    with pytest.raises(ValueError, match="steps_offset"):
        schedule("sd").timesteps(10, "leading", steps_offset=200)


def test_mixture_errors():
    s = schedule("sd")
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture(s, torch.zeros(3))
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixture(s, torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="elements per sample"):
        GaussianMixture(s, torch.zeros(2, 3))(torch.zeros(1, 4), 10.0)


def test_heun_needs_no_end_evaluation_at_sigma_zero():
    """Not an error but a guard: Heun's last step to sigma = 0 must not call an x0-model at sigma = 0."""
    s = EDM()
    calls = []

    def net(x, t):
        calls.append(float(t[0]))
        return x * 0.5

    bdia.sample(Model(net, s, "sample"), torch.randn(2, 3) * 80, s.timesteps(5), Heun())
    assert 0.0 not in calls
