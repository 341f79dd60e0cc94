"""Inherit, don't reset: a command on an input run uses every setting the run used (model, guidance, dtype, grid,
solver and its parameter) unless the command line changes it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("safetensors")

from bdia import batch
from bdia.__main__ import main

QUIET = "--no-progress"


def test_naming_the_same_solver_keeps_its_parameter(tmp_path, capsys):
    """``--solver bdia`` on a gamma = 0.5 run keeps gamma = 0.5 (before: reset to 1, latents off by 16% while the
    round trip still looked exact); the inverted latents are the noise the samples came from."""
    s, inv = tmp_path / "s", tmp_path / "inv"
    argv = ["sample", "--model", "gmm", "-n", "6", "--batch-size", "3", "--steps", "5", "--gamma", "0.5"]
    assert main([*argv, "--dtype", "float64", QUIET, "--out", str(s)]) == 0
    assert main(["invert", "--input", str(s), "--solver", "bdia", QUIET, "--out", str(inv)]) == 0
    manifest = batch.read_manifest(inv)
    assert manifest["description"]["gamma"] == 0.5 and "gamma=0.5" in manifest["solver"]
    assert manifest["dtype"] == "float64" and manifest["grid"] == batch.read_manifest(s)["grid"]
    z = torch.stack([batch.noise(0, i, (64,), torch.float64) for i in range(6)])
    latents = batch.load_dataset(inv).state.x
    assert float((latents - z).norm() / z.norm()) < 1e-10  # gamma 1 on a gamma 0.5 run: 0.1 and more
    # an explicit value is used, and the walk refuses to continue a gamma = 0.5 state with gamma = 1
    assert main(["invert", "--input", str(s), "--gamma", "1", QUIET, "--out", str(tmp_path / "g1")]) == 2
    err = capsys.readouterr().err
    assert "gamma=0.5" in err and "BDIA(DDIM(), gamma=1.0" in err and "Traceback" not in err
    assert "leave --steps, --spacing, --solver, --gamma and --p out" in err  # what a command-line user can do


def test_edict_keeps_p_and_a_new_step_count_keeps_the_spacing(tmp_path, capsys):
    s = tmp_path / "s"
    argv = ["sample", "--model", "gmm", "-n", "2", "--steps", "4", "--spacing", "leading", "--solver", "edict"]
    assert main([*argv, "--p", "0.8", QUIET, "--out", str(s)]) == 0
    assert main(["invert", "--input", str(s), "--solver", "edict", QUIET, "--out", str(tmp_path / "a")]) == 0
    assert batch.read_manifest(tmp_path / "a")["description"]["p"] == 0.8
    # --steps alone: the spacing is still the run's (a trailing grid of 4 steps is another grid, which the walk
    # would refuse to continue the run's states on)
    assert main(["invert", "--input", str(s), "--steps", "4", QUIET, "--out", str(tmp_path / "b")]) == 0
    d = batch.read_manifest(tmp_path / "b")["description"]
    assert (d["steps"], d["spacing"], d["solver"], d["p"]) == (4, "leading", "edict", 0.8)
    assert batch.read_manifest(tmp_path / "b")["grid"] == batch.read_manifest(s)["grid"]
    # another step count is another grid: the walk refuses to continue the run's states on it
    assert main(["invert", "--input", str(s), "--steps", "6", QUIET, "--out", str(tmp_path / "c")]) == 2
    assert "was made on a grid" in capsys.readouterr().err
