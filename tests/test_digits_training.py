"""Smoke tests of the training scripts in ``examples/`` (a few tiny steps each) and their reproducibility."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import pytest
import torch

from bdia import digits
from bdia.digits.nets import DigitsDenoiser

pytest.importorskip("sklearn")  # the scripts need scikit-learn's data set; the library does not

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Both scripts in smoke mode, the diffusion model twice (into two folders) to check reproducibility."""
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    digits, classifier = _script("train_digits"), _script("train_classifier")
    with _torch_state_kept():
        digits.train(digits.parse(["--smoke", "--out", str(a)]))
        digits.train(digits.parse(["--smoke", "--out", str(b)]))
        classifier.train(classifier.parse(["--smoke", "--out", str(a)]))
    return a, b


@contextlib.contextmanager
def _torch_state_kept():
    """The scripts set process-wide torch state for their run (deterministic kernels, threads): restore it after,
    so that no later test runs under it."""
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def test_smoke_training_writes_loadable_files(trained):
    a, _ = trained
    model = digits.model(data_dir=a)
    x, y = digits.heldout(data_dir=a)
    assert model(x[:2], 10.0, labels=y[:2]).eps.shape == (2, 1, 8, 8)
    clf = digits.classifier(data_dir=a)
    assert clf.features(x[:2]).shape == (2, clf.config["feature_dim"])


def test_training_is_reproducible(trained):
    a, b = trained
    sa = torch.load(a / digits.DENOISER_FILE, weights_only=True)["state_dict"]
    sb = torch.load(b / digits.DENOISER_FILE, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and the weights did move away from their (seeded) initialisation
    init = _script("train_digits")
    args = init.parse(["--smoke"])
    torch.manual_seed(args.seed)
    fresh = DigitsDenoiser(channels=args.channels, blocks=args.blocks).state_dict()
    assert not all(torch.equal(fresh[k], sa[k]) for k in sa)


def test_shipped_heldout_split_is_the_scripts_split(trained):
    # the held-out digits shipped in bdia/digits/data are exactly those the scripts hold out (same images, labels)
    a, _ = trained
    shipped = torch.load(digits.DATA_DIR / digits.HELDOUT_FILE, weights_only=True)
    made = torch.load(a / digits.HELDOUT_FILE, weights_only=True)
    for key in ("indices", "images", "labels"):
        assert torch.equal(shipped[key], made[key])
    images, labels = _script("train_digits").load_digits()
    assert torch.equal(images[shipped["indices"]], shipped["images"])
    assert torch.equal(labels[shipped["indices"]].to(torch.uint8), shipped["labels"])


def test_classifier_refuses_a_different_split(trained, tmp_path):
    a, _ = trained
    clf = _script("train_classifier")
    (tmp_path / digits.HELDOUT_FILE).write_bytes((a / digits.HELDOUT_FILE).read_bytes())
    with _torch_state_kept(), pytest.raises(RuntimeError, match="different held-out split"):
        clf.train(clf.parse(["--smoke", "--out", str(tmp_path), "--split-seed", "1"]))
