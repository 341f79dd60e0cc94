"""The shipped digits model, classifier and held-out data (``bdia.digits``), and its metrics."""

from __future__ import annotations

import math

import pytest
import torch

import bdia
from bdia import digits
from bdia.digits.metrics import DigitsJudge, class_accuracy, frechet_distance, sqrtm_psd
from bdia.models import Model
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM


@pytest.fixture(scope="module")
def heldout():
    return digits.heldout()


# ---------------------------------------------------------------- shipped files


def test_shipped_files_are_small_and_load_without_code():
    for name in (digits.DENOISER_FILE, digits.CLASSIFIER_FILE, digits.HELDOUT_FILE):
        path = digits.DATA_DIR / name
        assert path.stat().st_size <= 2_000_000, f"{name} exceeds the 2 MB limit"
        torch.load(path, weights_only=True)  # raises if anything but tensors and plain containers is pickled


def test_heldout_digits(heldout):
    x, y = heldout
    assert x.shape == (360, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (360,) and y.dtype == torch.long
    # pixels are 0..16 mapped to k/8 - 1
    assert torch.equal((x + 1) * 8, ((x + 1) * 8).round()) and x.min() >= -1 and x.max() <= 1
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 38  # stratified: 360 of 1797 is ~36 per class


def test_split_indices_is_a_stratified_deterministic_partition():
    labels = torch.arange(1000) % 7
    train, held = digits.split_indices(labels, n_heldout=200, seed=3)
    assert len(held) == 200 and len(train) == 800
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(1000))
    counts = torch.bincount(labels[held], minlength=7)
    assert counts.max() - counts.min() <= 1
    train2, held2 = digits.split_indices(labels, n_heldout=200, seed=3)
    assert torch.equal(held, held2) and torch.equal(train, train2)
    assert not torch.equal(held, digits.split_indices(labels, n_heldout=200, seed=4)[1])


def test_split_indices_rejects_bad_size():
    with pytest.raises(ValueError, match="n_heldout"):
        digits.split_indices(torch.arange(10) % 2, n_heldout=10)


# ---------------------------------------------------------------- the model


def test_digits_model_is_a_ready_denoiser(heldout):
    model = digits.model()
    assert isinstance(model, Model) and isinstance(model.schedule, DiscreteVP)
    assert model.schedule.num_train_timesteps == 1000
    x, y = heldout
    p1 = model(x[:8], 500.0, labels=y[:8])
    p2 = model(x[:8], 500.0, labels=y[:8])
    assert p1.x0.shape == x[:8].shape and p1.x0.dtype == torch.float32
    assert torch.equal(p1.eps, p2.eps)  # deterministic
    assert not any(p.requires_grad for p in model.net.parameters())


def test_digits_model_denoises_better_than_guessing(heldout):
    # At a moderate noise level a trained epsilon model must explain most of the noise: its eps error is far
    # below the noise's own size (a random net's is about sqrt(1 + 1) times it).
    x, y = heldout
    model = digits.model()
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(x.shape, generator=g)
    k = model.schedule.at(300.0)
    with torch.no_grad():
        pred = model(k.alpha * x + k.sigma * eps, 300.0, labels=y)
    assert float((pred.eps - eps).pow(2).mean()) < 0.2 * float(eps.pow(2).mean())


def test_guidance_scale_one_is_the_conditional_model(heldout):
    x, y = heldout
    plain, cfg1 = digits.model(), digits.model(guidance=1.0)
    a, b = plain(x[:16], 700.0, labels=y[:16]), cfg1(x[:16], 700.0, labels=y[:16])
    # u + 1 (c - u) differs from c by float32 rounding of |u| and |c| (a few ulps of values of order 1..10)
    tol = 8 * torch.finfo(torch.float32).eps * (1 + float(b.eps.abs().max()))
    assert torch.allclose(a.eps, b.eps, rtol=0, atol=tol)
    cfg0 = digits.model(guidance=0.0)(x[:16], 700.0, labels=y[:16])
    null = plain(x[:16], 700.0, labels=torch.full((16,), digits.NULL_CLASS))
    assert torch.allclose(cfg0.eps, null.eps, rtol=0, atol=tol)
    assert not torch.allclose(a.eps, null.eps, atol=1e-3)  # the label matters


def test_digits_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="guidance"):
        digits.model(guidance="2")
    with pytest.raises(FileNotFoundError, match="train_digits"):
        digits.model(data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"\(batch, 1, 8, 8\)"):
        digits.net()(torch.zeros(2, 64), torch.zeros(2))


def test_samples_show_the_requested_class():
    # 50 samples, 10 BDIA steps: the classifier must see the asked-for digit in most of them (the benchmark
    # measures ~0.9+; a broken model, schedule or label path gives ~0.1)
    model, clf = digits.model(), digits.classifier()
    labels = torch.arange(50) % 10
    noise = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = model.schedule.timesteps(10, "trailing")
    with torch.no_grad():
        x = bdia.sample(model, noise, ts, BDIA(DDIM(), 1.0), labels=labels).x
    assert class_accuracy(clf, x.clamp(-1, 1), labels) >= 0.8


def test_exact_round_trip_on_the_trained_model(heldout):
    # sample -> invert with BDIA gamma=1 rebuilds the noise to float64 rounding (a few steps, so the bound
    # is a small multiple of eps times the state's size), while DDIM inversion of the same samples does not
    model = digits.model(dtype=torch.float64)
    _, y = heldout
    labels = y[:4]
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = model.schedule.timesteps(6, "trailing")
    with torch.no_grad():
        for solver, exact in ((BDIA(DDIM(), 1.0), True), (DDIM(), False)):
            out = bdia.sample(model, noise, ts, solver, labels=labels)
            back = bdia.invert(model, out, ts, solver, labels=labels)
            err = float((back.x - noise).norm() / noise.norm())
            if exact:
                assert err < 1e4 * torch.finfo(torch.float64).eps
            else:
                assert err > 1e-3


def test_digits_float64_model(heldout):
    x, y = heldout
    m64 = digits.model(dtype=torch.float64)
    out = m64(x[:4].double(), 10.0, labels=y[:4])
    assert out.eps.dtype == torch.float64


# ---------------------------------------------------------------- the metrics


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)


def test_sqrtm_psd_squares_back():
    f = _features(50, 6, 0)
    a = f.T @ f
    r = sqrtm_psd(a)
    assert torch.allclose(r @ r, a, rtol=1e-10, atol=1e-10 * float(a.abs().max()))
    assert torch.allclose(r, r.T)
    with pytest.raises(ValueError, match="square"):
        sqrtm_psd(torch.zeros(2, 3))


def test_frechet_distance_closed_forms():
    f = _features(200, 5, 1)
    cov_trace = float(torch.cov(f.T).trace())
    assert abs(frechet_distance(f, f)) < 1e-9 * cov_trace
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # a shift moves only the means: FD = |shift|^2
    assert math.isclose(frechet_distance(f, f + shift), float(shift.pow(2).sum()), rel_tol=1e-9)
    # scaling by c scales the covariance by c^2, which commutes with it: FD = |mean diff|^2 + (1 - c)^2 tr S
    c = 1.7
    mu = f.mean(0)
    expected = float(((c - 1) * mu).pow(2).sum()) + (1 - c) ** 2 * cov_trace
    assert math.isclose(frechet_distance(f, c * f), expected, rel_tol=1e-9)
    assert math.isclose(frechet_distance(c * f, f), expected, rel_tol=1e-9)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="same feature size"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="f1"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))


def test_class_accuracy_rejects_bad_labels(heldout):
    x, _ = heldout
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(digits.classifier(), x[:4], torch.zeros(3, dtype=torch.long))


def test_classifier_and_real_vs_real_floor():
    judge = DigitsJudge.split(seed=0)
    floor = judge.floor()
    assert floor.accuracy >= 0.95  # the judge must recognise held-out real digits
    # real vs real is small next to real vs a blurred copy (a cheap stand-in for bad samples)
    blurred = torch.nn.functional.avg_pool2d(judge.compare, 3, stride=1, padding=1, count_include_pad=False)
    assert floor.fd < 0.5 * judge(blurred, judge.labels).fd
    assert len(judge.labels) == len(judge.compare) and len(judge.labels) >= 175


# ---------------------------------------------------------------- the quality benchmark


def test_quality_benchmark_quick(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from benchmarks import quality

    out = quality.run(quick=True, results_dir=tmp_path / "results", img_dir=tmp_path / "img")
    data = json.loads((tmp_path / "results" / "quality.json").read_text())
    assert data["benchmark"] == "quality" and data["quick"] is True and len(data["rows"]) == len(out["rows"]) > 0
    for png in ("digits_quality.png", "digits_samples_conditional.png"):
        assert (tmp_path / "img" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out["floor"]["accuracy_mean"] >= 0.9
    for r in out["rows"]:
        # a working model, schedule and label path: most samples show their class even at 5 steps (chance: 0.1)
        assert r["accuracy"] >= 0.6, r
        assert 0 < r["fd"] < math.inf
        assert r["NFE"] <= r["NFE budget"]


# ---------------------------------------------------------------- the demo


def test_digits_demo_reconstructs_exactly_and_writes_its_figure(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from bdia.digits import demo

    out = tmp_path / "edit.png"
    assert demo.main(["--count", "3", "--steps", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert all(name in text for name in demo.digits_methods())


def test_digits_demo_numbers():
    from bdia.digits import demo

    rows, result = demo.run_digits(steps=4, count=4, shift=3, guidance=2.0, strength=1.0, dtype=torch.float64)
    err = {r["method"]: r["max |rec - x|"] for r in rows}
    # exact schemes: float64 rounding, amplified by at most ~1/alpha(999) = 15 per step over a few steps
    for name in ("BDIA gamma=1", "EDICT p=0.93"):
        if name in err:
            assert err[name] < 1e6 * torch.finfo(torch.float64).eps, (name, err[name])
    assert err["DDIM inversion"] > 1e-2  # an approximate inversion misses by a visible fraction of a grey level
    assert torch.equal(result["target"], (result["labels"] + 3) % 10)
    assert rows[0]["NFE invert+sample"] == "4+3"  # DDIM: 4 steps back; sampling continues the pair
    with pytest.raises(ValueError, match="strength"):
        demo.run_digits(steps=4, count=2, shift=1, guidance=None, strength=0.0, dtype=torch.float32)


def test_demo_keeps_the_gaussian_mixture(capsys):
    from bdia.digits import demo

    assert demo.main(["--model", "gmm", "--steps", "5", "--batch", "4", "--dim", "4"]) == 0
    assert "Gaussian mixture" in capsys.readouterr().out


def test_write_png_without_matplotlib(tmp_path):
    import zlib

    from bdia.digits import demo

    img = torch.linspace(0, 1, 12).reshape(3, 4)
    demo.write_png(tmp_path / "a.png", img)
    data = (tmp_path / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    # decode the one IDAT chunk back: 3 scanlines of a filter byte and 4 grey bytes (0 = white: 255 - 255 v)
    n = int.from_bytes(data[33:37], "big")
    raw = zlib.decompress(data[41 : 41 + n])
    assert len(raw) == 3 * 5 and raw[1] == 255 and raw[-1] == 0


def test_labels_outside_the_classes_are_refused_by_name(heldout):
    """Class 11 or -1 is not a digit: a clear error naming labels and the range (before: IndexError from the
    embedding); a bool tensor is not a class either."""
    x, _ = heldout
    model = digits.model()
    for bad in (11, -1):
        labels = torch.tensor([3, bad, 10])
        with pytest.raises(ValueError, match=rf"labels must be classes 0..10 \(10: unconditional\), got {bad}"):
            model(x[:3], 500.0, labels=labels)
        with pytest.raises(ValueError, match=rf"got {bad}"):
            digits.model(guidance=2.0)(x[:3], 500.0, labels=labels)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model(x[:2], 500.0, labels=torch.tensor([True, False]))
    model(x[:3], 500.0, labels=torch.tensor([0, 9, 10]))  # the range's ends


def _contains(page: torch.Tensor, pattern: torch.Tensor) -> bool:
    """Whether the binary ``pattern`` appears, pixel for pixel, somewhere in the binary ``page``."""
    rows = [bytes(r) for r in page.to(torch.uint8).tolist()]
    want = [bytes(r) for r in pattern.to(torch.uint8).tolist()]
    h, w = len(want), len(want[0])
    for top in range(len(rows) - h + 1):
        left = rows[top].find(want[0])
        while left >= 0:
            if all(rows[top + i][left : left + w] == want[i] for i in range(1, h)):
                return True
            left = rows[top].find(want[0], left + 1)
    return False


def test_demo_figure_without_matplotlib_is_captioned(tmp_path, monkeypatch, capsys):
    """Without matplotlib (it is only in the test extra) the figure still names its rows (methods, errors), its
    columns and the classes (before: digits only, and a line on stdout saying there were no captions)."""
    from bdia import batch
    from bdia.digits import caption, demo

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    out = tmp_path / "edit.png"
    assert demo.main(["--count", "3", "--steps", "4", "--out", str(out)]) == 0
    assert "no captions" not in capsys.readouterr().out
    page = (1 - batch.read_png(out, torch.float64)[0]) / 2  # ink: 1 = black
    assert page.shape[1] > page.shape[0] > 100
    binary = (page > 0.99).double()  # the captions are pure black on white
    for words in (*demo.digits_methods(), "max err", "original (class above each)", "edit (new class)", "x 4"):
        assert _contains(binary, caption.text(words, 2)), words
    assert not _contains(binary, caption.text("EDICT P=0.94", 2))  # the search can fail


def test_caption_font_refuses_what_it_cannot_draw():
    from bdia.digits import caption

    assert caption.text("ab", 3).shape == (21, 33) and caption.text("", 1).shape == (7, 0)
    with pytest.raises(ValueError, match=r"characters the caption font lacks: \['\?'\]"):
        caption.text("why?")
    with pytest.raises(ValueError, match="scale must be an int >= 1"):
        caption.text("a", 0)
