"""The command line answers like a command line: a usage error exits 2 naming the option, a run folder or file
that cannot be used exits 1 naming the file, never a traceback; the current folder's modules are found for
--model; a finished run resumed says so."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

from bdia import batch
from bdia.__main__ import main

GMM = ["sample", "--model", "gmm", "-n", "4", "--batch-size", "2", "--steps", "3", "--no-progress"]


def raising_factory(*, device, dtype):
    """A ``--model`` factory that fails, as a user's can."""
    raise RuntimeError("no such checkpoint: /models/sd15.ckpt")


def midway_factory(*, device, dtype):
    """A ``--model`` factory whose network raises a ValueError at its third call, as a user's can mid-walk."""
    import torch

    from bdia.models import Model
    from bdia.schedules import DiscreteVP

    calls = []

    def net(x, t):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("the attention mask does not match")
        return torch.zeros_like(x)

    return Model(net, DiscreteVP.stable_diffusion(), "epsilon")


def nan_factory(*, device, dtype):
    """A ``--model`` factory whose network returns NaN: the walk fails at its end, naming the step."""
    import torch

    from bdia.models import Model
    from bdia.schedules import DiscreteVP

    return Model(lambda x, t: torch.full_like(x, float("nan")), DiscreteVP.stable_diffusion(), "epsilon")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("midway_factory", "the run failed: ValueError: the attention mask does not match"),
        ("nan_factory", "the run failed: FloatingPointError: non-finite values (NaN or inf) produced in step 1"),
    ],
)
def test_a_walk_that_fails_once_its_network_ran_exits_1_not_as_a_usage_error(tmp_path, capsys, factory, message):
    """Exit 2 is for what is refused before any network call; an error raised by the network, or a walk that turns
    non-finite, is the run failing (exit 1), said as such, without a traceback."""
    argv = [*GMM, "--model", f"tests.test_cli_errors:{factory}", "--shape", "4", "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "settings were refused" not in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gamma", "2"], "--gamma 2: gamma must lie in [0, 1]"),
        (["--gamma", "nan"], "argument --gamma: expected a finite number, got 'nan'"),
        (["--solver", "edict", "--p", "0"], "--p 0: p must lie in (0, 1]"),
        (["--seed", "-1"], "argument --seed: expected an int >= 0, got '-1'"),
        (["--steps", "5000"], "--steps 5000: n must be an int in [1, 1000]"),
        (["--device", "meta"], "--device meta: expected auto, cpu, cuda, cuda:N or mps"),
        (
            ["--model", "tests.test_cli_errors:raising_factory", "--shape", "4"],
            "building the model failed (RuntimeError",
        ),
        (["--stats", "{tmp}/no/such/folder/s.json"], "--stats {tmp}/no/such/folder/s.json: the folder"),
        (["--stats", "{tmp}"], "--stats {tmp} is a folder"),
        (["--guidance", "inf"], "argument --guidance: expected a finite number"),
    ],
)
def test_usage_errors_exit_2_naming_the_option_without_a_traceback(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    argv = [*GMM, *args, "--out", str(out)]  # (a second --model replaces the first)
    assert main(argv) == 2  # before: a traceback (the exception escaped main) for all but --guidance's
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_out_an_existing_file(tmp_path, capsys):
    (tmp_path / "f").write_text("mine")
    assert main([*GMM, "--out", str(tmp_path / "f")]) == 2
    assert f"--out {tmp_path / 'f'} is an existing file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "mine"


def test_a_full_disk_exits_1_naming_the_shard_and_leaves_no_temporary_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    real = batch.os.fsync
    calls = []

    def full(fd):
        calls.append(fd)
        if len(calls) == 2:  # the manifest goes through, the first shard does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(batch.os, "fsync", full)
    assert main([*GMM, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / batch.shard_name(0)}: No space left on device" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == [".bdia.lock", "manifest.json"]
    monkeypatch.setattr(batch.os, "fsync", real)
    assert main([*GMM, "--out", str(out)]) == 0  # space again: the run resumes


def test_a_damaged_input_run_exits_1_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*GMM, "--out", str(run)]) == 0
    shard = run / batch.shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["invert", "--input", str(run), "--no-progress", "--out", str(tmp_path / "inv")]) == 1
    err = capsys.readouterr().err
    assert f"{shard} is damaged" in err and "Traceback" not in err
    (run / batch.MANIFEST).write_text('{"format": "bdia.batch/2", "num": ')
    assert main(["invert", "--input", str(run), "--no-progress", "--out", str(tmp_path / "inv2")]) == 1
    assert f"{run / batch.MANIFEST} is not valid JSON" in capsys.readouterr().err


def test_resuming_a_finished_run_says_so(tmp_path, capsys):
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    assert main([*GMM, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*GMM, "--out", str(out), "--stats", str(stats)]) == 0
    text = capsys.readouterr().out
    assert "nan" not in text and "nothing to do: all 2 shards" in text  # before: "writing shards nan% of the time"
    figures = json.loads(stats.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the stats"))
    assert figures["computed"] == 0 and figures["write_share"] is None


def test_a_module_in_the_current_folder_is_found_for_model(tmp_path, monkeypatch, capsys):
    """As ``python -m bdia`` finds it; the ``bdia`` command (its sys.path[0] is its script's folder) did not. The
    folder is on the path for that import only."""
    (tmp_path / "my_factory_in_cwd.py").write_text(
        "from bdia.__main__ import _gmm\n\ndef make(*, device, dtype):\n    return _gmm(device, dtype, None)\n"
    )
    monkeypatch.chdir(tmp_path)
    for entry in ("", str(tmp_path)):
        monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p != entry])
    before = list(__import__("sys").path)
    argv = [*GMM, "--shape", "64", "--out", "out"]
    argv[2] = "my_factory_in_cwd:make"
    assert main(argv) == 0, capsys.readouterr().err
    assert __import__("sys").path == before
    assert batch.read_manifest(Path("out"))["description"]["model"] == "my_factory_in_cwd:make"
