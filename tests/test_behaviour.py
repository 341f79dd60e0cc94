"""What a user meets first: no graph by default, clean-data inversion on every grid kind, nested CFG conditioning,
strength, states that move and save, callbacks that see the prediction and can stop, and every input that cannot
give the right answer refused before any model call."""

from __future__ import annotations

import gc
import math
import pickle
import re
import weakref

import pytest
import torch

import bdia
from bdia import digits
from bdia.exact import Exact, ExactState
from bdia.gradients import sample_with_grad
from bdia.models import CFG, CountNFE, GaussianMixture, Model
from bdia.schedules import EDM, DiscreteVP, Flow
from bdia.solvers import BDIA, DDIM, EDICT, OBELM, Euler, Heun
from bdia.state import State, load, save
from tests.conftest import gmm_net, model_for, rel_err, schedule

SD = schedule("sd")
TS = SD.timesteps(10, "leading", steps_offset=1)


def _noise(shape=(3, 8), seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- no autograd graph by default ---------------------------------------------------------------------------


def test_walks_record_no_graph_unless_asked():
    lin = torch.nn.Linear(8, 8).double()
    model = Model(lambda x, t: torch.tanh(lin(x)), SD, "epsilon")
    x = _noise()
    assert not bdia.sample(model, x, TS, BDIA()).x.requires_grad
    assert not bdia.invert(model, x, TS, BDIA()).x.requires_grad
    assert bdia.sample(model, x, TS, BDIA(), grad=True).x.requires_grad
    assert torch.is_grad_enabled()  # the caller's mode is restored


# ---- inversion of clean data where sigma = 0 ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "prediction", "ts"),
    [
        ("edm", "sample", EDM().timesteps(18)),
        ("edm", "epsilon", EDM().timesteps(18)),
        ("flow", "velocity", Flow().timesteps(12)),
        ("flow", "sample", Flow().timesteps(12)),
        ("sd", "sample", SD.timesteps(10, "trailing", set_alpha_to_one=True)),
        ("sd", "v", SD.timesteps(10, "trailing", set_alpha_to_one=True)),
        ("sd", "epsilon", SD.timesteps(10, "trailing", set_alpha_to_one=True)),
    ],
)
def test_clean_data_inverts_on_grids_ending_at_sigma_zero(kind, prediction, ts):
    model = model_for(kind, prediction)
    data = model_for(kind, None).sample(4, generator=torch.Generator().manual_seed(3))
    times = []
    probe = Model(
        lambda x, t, f=model.net: times.append(float(t[0])) or f(x, t),
        model.schedule,
        prediction,
        time_dtype=torch.float64,
    )
    z = bdia.invert(probe, data, ts, BDIA())
    assert bool(torch.isfinite(z.x).all())
    assert min(times) > float(ts[-1])  # the network is never asked where sigma = 0 (t = -1 for discrete VP)
    # the first step's prediction: x0 = the data and eps at the next grid time, and the pair samples back exactly
    rec = bdia.sample(model, z, ts, BDIA())
    assert rel_err(rec.x, data) < 1e-12


# ---- classifier-free guidance with nested conditioning ---------------------------------------------------------


def test_cfg_batches_dicts_lists_and_equal_non_tensors():
    seen = {}

    def net(x, t, encoder_hidden_states, added_cond_kwargs, extra, scale_name):
        seen.update(ehs=encoder_hidden_states, add=added_cond_kwargs, extra=extra, name=scale_name)
        return x * added_cond_kwargs["text_embeds"].mean(-1, keepdim=True) + extra[0][:, :1]

    B = 3
    uncond = dict(
        encoder_hidden_states=torch.zeros(1, 4, 5),
        added_cond_kwargs={"text_embeds": torch.zeros(1, 6), "time_ids": torch.zeros(1, 6)},
        extra=[torch.zeros(1, 8)],
        scale_name="sdxl",
    )
    cond = dict(
        encoder_hidden_states=torch.ones(B, 4, 5),
        added_cond_kwargs={"text_embeds": torch.ones(B, 6), "time_ids": torch.ones(1, 6)},
        extra=[torch.ones(B, 8)],
        scale_name="sdxl",
    )
    out = CFG(net, 2.0, **uncond)(torch.ones(B, 8), torch.full((B,), 5.0), **cond)
    assert seen["ehs"].shape == (2 * B, 4, 5) and seen["add"]["time_ids"].shape == (2 * B, 6)
    assert isinstance(seen["extra"], list) and seen["name"] == "sdxl"
    # u = 0, c = 1 + 1: u + 2 (c - u) = 4
    assert torch.equal(out, torch.full((B, 8), 4.0))
    with pytest.raises(ValueError, match="same keys"):
        CFG(net, 2.0, **{**uncond, "added_cond_kwargs": {"text_embeds": torch.zeros(1, 6)}})(
            torch.ones(B, 8), torch.full((B,), 5.0), **cond
        )
    with pytest.raises(ValueError, match="must equal its unconditional value"):
        CFG(net, 2.0, **uncond)(torch.ones(B, 8), torch.full((B,), 5.0), **{**cond, "scale_name": "other"})


# ---- gradients never silently dropped ------------------------------------------------------------------------


def test_sample_with_grad_finds_weights_through_a_lambda_or_asks_for_them():
    lin = torch.nn.Linear(8, 8).double()
    model = Model(lambda x, t: torch.tanh(lin(x)), SD, "epsilon")  # the natural glue around a UNet
    out = sample_with_grad(model, _noise(), TS, BDIA())
    out.x.square().sum().backward()
    assert lin.weight.grad is not None and float(lin.weight.grad.norm()) > 0
    gmm = model_for("sd", None)
    x = _noise().requires_grad_()
    with pytest.raises(ValueError, match="found no torch.nn.Module"):
        sample_with_grad(gmm, x, TS, BDIA())
    sample_with_grad(gmm, x, TS, BDIA(), params=()).x.sum().backward()
    assert x.grad is not None


def test_sample_with_grad_refuses_before_work():
    gmm = CountNFE(model_for("sd", None))
    with pytest.raises(ValueError, match="nothing to differentiate"):
        sample_with_grad(gmm, _noise(), TS, BDIA(), params=())
    with pytest.raises(ValueError, match="gamma = 0 at the step"):
        sample_with_grad(gmm, _noise().requires_grad_(), TS, BDIA(DDIM(), 0.0), params=(), checkpoint_every=3)
    with pytest.raises(FloatingPointError, match="in the input"):
        sample_with_grad(gmm, torch.full((3, 8), math.nan, requires_grad=True), TS, BDIA(), params=())
    assert gmm.calls == 0
    bad = Model(lambda x, t: torch.where(t[:, None] < 500, math.nan, x), SD, "epsilon")
    with pytest.raises(FloatingPointError, match="produced in step"):
        sample_with_grad(bad, _noise().requires_grad_(), TS, BDIA(), params=())


# ---- strength, callbacks -------------------------------------------------------------------------------------


def test_strength_walks_the_last_steps_as_img2img_does():
    gmm = CountNFE(model_for("sd", None))
    data = gmm.model.sample(2, generator=torch.Generator().manual_seed(1))
    z = bdia.invert(gmm, data, TS, BDIA(), strength=0.6)
    assert z.t == float(TS[len(TS) - 1 - 6]) and gmm.calls == 6
    assert rel_err(bdia.sample(gmm, z, TS, BDIA(), strength=0.6).x, data) < 1e-12
    for bad in (0.0, 1.5, True, 0.05):
        with pytest.raises(ValueError, match="strength"):
            bdia.invert(gmm, data, TS, BDIA(), strength=bad)


def test_callback_sees_the_prediction_and_can_stop():
    gmm = model_for("sd", None)
    seen = []

    def cb(step):
        seen.append((step.i, step.t, step.t_next, step.x0.clone(), gmm(step.x, step.t).x0))
        return step.i == 4

    out = bdia.sample(gmm, _noise(), TS, BDIA(), callback=cb)
    assert [s[0] for s in seen] == [1, 2, 3, 4] and out.t == float(TS[4])
    assert all(torch.equal(a, b) for *_, a, b in seen)  # x0 is the model's prediction at (x, t)
    assert (seen[0][1], seen[0][2]) == (float(TS[0]), float(TS[1]))


# ---- states that save and move -------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_states_save_and_load_bit_for_bit(tmp_path, suffix):
    pytest.importorskip("safetensors") if suffix == ".safetensors" else None
    gmm = model_for("sd", None)
    for solver in (BDIA(), EDICT(), Exact(BDIA(DDIM(), 0.5))):
        out = bdia.sample(gmm, _noise(dtype=torch.float32), TS, solver)
        save(out, tmp_path / f"s{suffix}")
        back = load(tmp_path / f"s{suffix}")
        assert type(back) is type(out) and (back.t_prev, back.t, back.coupled) == (out.t_prev, out.t, out.coupled)
        assert torch.equal(back.x, out.x) and torch.equal(back.x_prev, out.x_prev)
        if isinstance(out, ExactState):
            assert torch.equal(back.fixed.buffer, out.fixed.buffer) and back.fixed.bound == out.fixed.bound
            assert torch.equal(bdia.invert(gmm, back, TS, solver).fixed.X, bdia.invert(gmm, out, TS, solver).fixed.X)
    d = torch.load(tmp_path / "s.pt", weights_only=True) if suffix == ".pt" else None
    assert d is None or d["type"] == "ExactState"


def test_state_to_moves_and_casts_and_exact_states_stay_exact():
    gmm = model_for("sd", None)
    out = bdia.sample(gmm, _noise(dtype=torch.float32), TS, BDIA())
    o64 = out.to(torch.float64)
    assert o64.x.dtype == torch.float64 and o64.t == out.t and out.x.dtype == torch.float32
    ex = Exact(BDIA(DDIM(), 0.5))
    s = bdia.sample(gmm, _noise(dtype=torch.float32), TS, ex)
    s64 = s.to(torch.float64)  # the floats are dequantised again from the integers: exactly X 2^-k in float64
    assert torch.equal(s64.fixed.X, s.fixed.X) and torch.equal(s64.x, s.fixed.X.double() * 2.0**-s.fixed.frac_bits)
    moved = s.to("cpu")  # a device move keeps every bit, so the inversion is the same
    assert torch.equal(bdia.invert(gmm, moved, TS, ex).fixed.X, bdia.invert(gmm, s, TS, ex).fixed.X)


def test_exact_state_rows_invert_exactly_and_edits_are_refused():
    gmm = model_for("sd", None)
    ex = Exact(BDIA(DDIM(), 0.5))
    noise = _noise((4, 8), dtype=torch.float32)
    out = bdia.sample(gmm, noise, TS, ex)
    whole = bdia.invert(gmm, out, TS, ex)
    one = bdia.invert(gmm, out[2], TS, ex)
    assert torch.equal(one.fixed.X, whole.fixed.X[2:3])
    with pytest.raises(ValueError, match="plain bdia.State"):
        bdia.invert(gmm, State(out.x_prev[2:3], out.x[2:3], out.t_prev, out.t), TS, ex)
    with pytest.raises(ValueError, match="view of its integers"):
        out.replace(x=out.x + 1)
    assert out._replace(t=out.t).fixed is out.fixed
    edited = out.replace(t=out.t)
    edited.x.add_(1.0)
    with pytest.raises(ValueError, match="modified in place"):
        bdia.invert(gmm, edited, TS, ex)


# ---- refused before any work ---------------------------------------------------------------------------------


def test_a_state_from_another_solver_is_refused():
    gmm = model_for("sd", None)
    edict = bdia.sample(gmm, _noise(), TS, EDICT())
    for solver in (BDIA(), OBELM(), DDIM(), Exact(BDIA())):
        with pytest.raises(ValueError, match="made by EDICT"):
            bdia.invert(gmm, edict, TS, solver)
    with pytest.raises(ValueError, match="made by another solver"):
        bdia.invert(gmm, bdia.sample(gmm, _noise(), TS, BDIA()), TS, EDICT())


def test_per_step_gamma_tensors_and_per_sample_copies():
    gmm = model_for("sd", None)
    with pytest.raises(TypeError, match="returned a tensor"):
        bdia.sample(gmm, _noise(), TS, BDIA(DDIM(), lambda s, tp, t, tn: torch.tensor([0.5, 0.5, 0.5])))
    g = torch.tensor([0.5, 1.0, 0.7], requires_grad=True)
    solver = BDIA(DDIM(), g)
    with torch.no_grad():
        g.mul_(3.0)  # an edit after construction changes nothing
    a = bdia.sample(gmm, _noise(), TS, solver)
    b = bdia.sample(gmm, _noise(), TS, BDIA(DDIM(), torch.tensor([0.5, 1.0, 0.7])))
    assert torch.equal(a.x, b.x) and not bdia.sample(gmm, _noise(), TS, solver, grad=True).x.requires_grad


def test_unbounded_amplification_is_refused_before_any_model_call():
    gmm = CountNFE(model_for("sd", None))
    bad = torch.tensor([999.0, 500.0, 500.0 - 1e-6, 0.0], dtype=torch.float64)  # O-BELM's last gamma is 1.6e17 here
    with pytest.raises(ValueError, match="amplify rounding errors"):
        bdia.sample(gmm, _noise(), bad, OBELM())
    assert gmm.calls == 0
    assert bdia.sample(gmm, _noise(), bad, OBELM(), max_amplification=math.inf).x.shape == (3, 8)
    with pytest.raises(ValueError, match="max_amplification must be"):
        bdia.sample(gmm, _noise(), TS, OBELM(), max_amplification=0.5)


def test_non_finite_input_and_wrong_objects_are_refused_before_any_model_call():
    gmm = CountNFE(model_for("sd", None))
    x = _noise()
    x[1, 2] = math.nan
    with pytest.raises(FloatingPointError, match="in the input"):
        bdia.sample(gmm, x, TS, BDIA())
    assert gmm.calls == 0
    for solver, match in ((None, "solver must have"), ("bdia", "solver must have"), (BDIA, r"instance, e.g. BDIA\(\)")):
        with pytest.raises(TypeError, match=match):
            bdia.sample(gmm, _noise(), TS, solver)
    for model in (None, "gmm", lambda x, t: x, torch.nn.Identity(), Model):
        with pytest.raises(TypeError, match="model must be a denoiser"):
            bdia.sample(model, _noise(), TS, BDIA())
    with pytest.raises(TypeError, match=r"instance, e.g. Heun\(\)"):
        BDIA(Heun)


def test_exact_overflow_says_the_range_was_left_by_how_much():
    # an x0 model whose answer (1e10) lies beyond float32's default fixed-point range, 2^31: the first step asks for
    # (1 - 24.4 / 80) 1e10 = 7e9, 3.2 times the range
    big = Model(lambda x, t: 1e10 * torch.ones_like(x), EDM(), "sample")
    ts, x = EDM().timesteps(6), 80 * _noise(dtype=torch.float32)
    with pytest.raises(
        FloatingPointError, match=r"range .* was left: the walk asked for .*, 3.2. times the range"
    ) as e:
        bdia.sample(big, x, ts, Exact(BDIA()))
    k = int(re.search(r"frac_bits=(\d+) or less", str(e.value)).group(1))
    assert k < 30 and bool(torch.isfinite(bdia.sample(big, x, ts, Exact(BDIA(), frac_bits=k)).x).all())


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: DiscreteVP.from_betas(num_train_timesteps=2.5), TypeError),
        (lambda: SD.timesteps(True), ValueError),
        (lambda: SD.timesteps(10, steps_offset=0.5), TypeError),
        (lambda: EDM(sigma_max=math.inf), ValueError),
        (lambda: Flow().timesteps(10, shift=math.inf), ValueError),
        (lambda: GaussianMixture(SD, torch.tensor([[math.nan, 0.0]])), ValueError),
        (lambda: GaussianMixture("sd", torch.zeros(2, 2)), TypeError),
        (lambda: Model(lambda x, t: x, SD, time_dtype=torch.int64)(torch.zeros(2, 3), 500.5), ValueError),
        (lambda: Model(lambda x, t: x, SD, time_dtype="float32"), TypeError),
        (
            lambda: (m := Model(lambda x, t: x, SD)).predict(torch.zeros(2, 3), m.prepare(500.0, torch.zeros(2, 4))),
            ValueError,
        ),
        (lambda: model_for("sd", None)(torch.zeros(2, 8), 500.0, label=torch.zeros(2)), TypeError),
        (lambda: digits.net()(torch.zeros(2, 1, 8, 8), torch.zeros(2), labels=torch.tensor([1.7, 2.2])), TypeError),
    ],
)
def test_malformed_arguments_are_not_coerced(make, error):
    with pytest.raises(error):
        make()


# ---- resources and safe loading ------------------------------------------------------------------------------


def test_a_solver_does_not_keep_schedules_alive():
    solver = BDIA()
    refs = []
    for seed in range(5):
        s = DiscreteVP.stable_diffusion()
        gmm = GaussianMixture.random(s, dim=4, components=2, seed=seed)
        bdia.sample(gmm, _noise((2, 4)), s.timesteps(10, "leading", steps_offset=1), solver)
        refs.append(weakref.ref(s))
        del s, gmm
    gc.collect()
    assert all(r() is None for r in refs)  # the walk's plans keep no schedule or model alive
    assert digits.schedule() is digits.schedule()  # the shipped model's schedule is built once


class _Payload:
    ran = False

    def __reduce__(self):
        return (setattr, (_Payload, "ran", True))


def test_a_malicious_pickle_in_place_of_shipped_weights_is_refused(tmp_path):
    with open(tmp_path / digits.DENOISER_FILE, "wb") as f:
        pickle.dump({"config": _Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        digits.model(data_dir=tmp_path)
    assert not _Payload.ran


def test_velocity_nets_and_euler_need_nothing_special():
    flow = model_for("flow", None)
    model = Model(gmm_net(flow, "velocity"), flow.schedule, "velocity", time_dtype=torch.float64)
    ts = Flow().timesteps(8)
    out = bdia.sample(model, _noise(), ts, BDIA(Euler()))
    assert rel_err(bdia.invert(model, out, ts, BDIA(Euler())).x, _noise()) < 1e-12


def test_model_reuses_its_time_tensor_until_the_network_edits_it():
    """A walk's plan builds the (batch,) time tensors once for its grid and the next walk reuses them; a network that
    modifies its time tensor in place gets a fresh one, so every call sees its own time."""
    seen = []

    def net(x, t):
        seen.append((t, t.clone()))
        t.add_(1000.0)  # a (misbehaving) network that edits its input
        return torch.zeros_like(x)

    schedule = DiscreteVP.stable_diffusion()
    ts, solver, x = schedule.timesteps(4, "leading", steps_offset=1), BDIA(), torch.zeros(3, 4)
    model = Model(net, schedule, "epsilon")
    for _ in range(2):
        bdia.sample(model, x, ts, solver)
    times = [v.tolist() for _, v in seen]
    assert times == 2 * [[t] * 3 for t in ts.tolist()[:-1]]  # every call saw its own time, in both walks
    assert seen[1][0] is not seen[5][0]  # rebuilt after the edit

    seen.clear()
    polite = Model(lambda x, t: seen.append(t) or torch.zeros_like(x), schedule, "epsilon")
    for latent in (x, x, x[:2]):
        bdia.sample(polite, latent, ts, solver)
    assert all(a is b for a, b in zip(seen[1:4], seen[5:8], strict=True))  # the second walk reused the plan's
    assert seen[9].shape == (2,)  # another batch size: another plan
