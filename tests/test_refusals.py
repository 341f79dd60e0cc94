"""Nothing silently wrong: what the core refuses, stops on or keeps, each case one a user met."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import bdia
from bdia.exact import Exact, quantise
from bdia.gradients import sample_with_grad
from bdia.models import CFG, GaussianMixture, Model
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM

SD = DiscreteVP.stable_diffusion()
TS = SD.timesteps(8, "leading", steps_offset=1)


def mixture() -> GaussianMixture:
    return GaussianMixture.random(SD, dim=4, components=3, std=0.5, seed=0)


@pytest.mark.parametrize("stop", [True, np.True_, 1, torch.tensor(True), torch.tensor([1])], ids=repr)
def test_any_true_answer_stops_the_walk(stop):
    steps = []
    out = bdia.sample(mixture(), torch.randn(2, 4), TS, BDIA(), callback=lambda s: steps.append(s.i) or stop)
    assert steps == [1] and out.t == float(TS[1])


@pytest.mark.parametrize("go_on", [None, False, np.False_, 0, torch.tensor(False)], ids=repr)
def test_a_false_answer_goes_on(go_on):
    steps = []
    bdia.sample(mixture(), torch.randn(2, 4), TS, BDIA(), callback=lambda s: steps.append(s.i) or go_on)
    assert steps == list(range(1, len(TS)))


def test_an_answer_that_is_no_truth_value_is_named():
    with pytest.raises(TypeError, match="the callback returned str"):
        bdia.sample(mixture(), torch.randn(2, 4), TS, BDIA(), callback=lambda s: "stop")
    with pytest.raises(TypeError, match="callback must be callable"):
        bdia.sample(mixture(), torch.randn(2, 4), TS, BDIA(), callback="print")


@pytest.mark.parametrize("keyword", ["callback", "progress", "strength", "check_finite", "max_amplification", "grad"])
def test_sample_with_grad_does_not_pass_walk_keywords_to_the_network(keyword):
    seen = []

    def net(x, t, **kw):
        seen.append(kw)
        return torch.zeros_like(x)

    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(TypeError, match=f"does not take {keyword}="):
        sample_with_grad(Model(net, SD), x, TS, BDIA(), params=(), **{keyword: None})
    assert seen == []


def test_deterministic_exact_walks_in_threads_restore_the_global_mode():
    assert not torch.are_deterministic_algorithms_enabled()
    gmm = mixture()
    solver = Exact(BDIA(DDIM(), 0.5), deterministic=True)
    errors = []

    def run(seed: int) -> None:
        try:
            x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
            out = bdia.sample(gmm, x, TS, solver)
            back = bdia.invert(gmm, out, TS, solver)
            assert torch.equal(back.fixed.X, quantise(x, out.fixed.frac_bits)[0])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    "scale,match",
    [("7.5", "scale must be a finite number"), (float("nan"), "finite"), (True, "finite number"),
     (torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1), "1-D"), (torch.tensor([1.0, float("inf")]), "finite values")],
    ids=["str", "nan", "bool", "2-D", "inf"],
)  # fmt: skip
def test_guidance_scale_is_checked_when_built(scale, match):
    with pytest.raises(ValueError, match=match):
        CFG(lambda x, t, **kw: x, scale, c=torch.zeros(1, 2))


def test_a_per_sample_guidance_scale_must_fit_the_batch():
    guided = CFG(lambda x, t, c: x * c.sum(), torch.tensor([1.0, 2.0, 3.0]), c=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        guided(torch.ones(2, 4), torch.zeros(2), c=torch.ones(1, 2))


def test_a_grid_of_one_time_is_refused_where_it_is_made():
    with pytest.raises(ValueError, match="single time 0"):
        SD.timesteps(1, "leading")
    assert SD.timesteps(1, "leading", steps_offset=1).tolist() == [1.0, 0.0]


def test_mixture_labels_and_empty_batches():
    gmm = mixture()
    with pytest.raises(ValueError, match=r"labels must lie in \[-1, 2\]"):
        gmm(torch.zeros(2, 4), 500.0, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        gmm.sample(2, labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="shape"):
        gmm(torch.zeros(2, 4), 500.0, labels=torch.tensor([0]))
    empty = gmm(torch.zeros(0, 4), 500.0)
    assert empty.x0.shape == (0, 4)


def test_an_empty_gamma_tensor_is_refused_clearly():
    with pytest.raises(ValueError, match="one entry per sample"):
        BDIA(DDIM(), torch.tensor([]))


def test_exact_with_gamma_zero_is_refused_before_any_walk():
    with pytest.raises(ValueError, match="cannot be inverted"):
        Exact(BDIA(DDIM(), 0.0))
