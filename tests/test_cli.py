"""The command line: ``bdia`` / ``python -m bdia`` list their commands, print the version, forward ``demo`` and
reject unknown commands and unusable arguments with exit status 2 (in-process and as real processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import bdia
from bdia.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("sample", "invert", "demo")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(list(cmd), env=env, capture_output=True, text=True, timeout=120)


def test_python_m_bdia_help_lists_the_commands():
    r = _run(sys.executable, "-m", "bdia", "--help")
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in COMMANDS) and "torchrun" in r.stdout


def test_console_script_prints_the_version():
    script = shutil.which("bdia", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the bdia console script is not installed next to this python (pip install -e .)")
    r = _run(script, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bdia {bdia.__version__}", r.stderr


def test_unknown_command_exits_2_with_usage():
    r = _run(sys.executable, "-m", "bdia", "frobnicate")
    assert r.returncode == 2 and "usage: bdia" in r.stderr and "invalid choice" in r.stderr


def test_in_process(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bdia {bdia.__version__}"
    for argv in (["frobnicate"], [], ["sample"], ["--no-such-option"]):
        assert main(argv) == 2, argv
        assert "usage: bdia" in capsys.readouterr().err
    assert main(["sample", "--help"]) == 0
    assert "--batch-size" in capsys.readouterr().out


def test_demo_is_forwarded(capsys):
    assert main(["demo", "--model", "gmm", "--steps", "3", "--batch", "2", "--dim", "4"]) == 0
    assert "BDIA gamma=1" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    assert "python -m bdia demo" in capsys.readouterr().out
    assert main(["demo", "--model", "nothing"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "--out", "x"], "give --num"),
        (["sample", "-n", "4", "--solver", "edict", "--gamma", "0.5"], "--gamma applies to --solver bdia only"),
        (["sample", "-n", "4", "--solver", "bdia", "--p", "0.9"], "--p applies to --solver edict only"),
        (["sample", "-n", "4", "--class", "11"], "--class must lie in 0..10"),
        (["sample", "-n", "4", "--model", "gmm", "--guidance", "2"], "does not apply to --model gmm"),
        (["sample", "-n", "4", "--model", "nomodule"], "module:attribute"),
        (["sample", "-n", "4", "--model", "no_such_module_xyz:f"], "cannot import"),
        (["sample", "-n", "4", "--model", "tests.test_batch:slow_digits"], "--shape is needed"),
        (["sample", "-n", "4", "--shape", "1,8,8"], "--shape is for module:attribute models"),
        (["sample", "-n", "0"], "expected an int >= 1"),
        (["sample", "-n", "4", "--shape", "1,x"], "expected sizes separated by commas"),
        (["sample", "-n", "4", "--model", "builtins:dict"], "not a denoiser"),
        (["sample", "-n", "4", "--device", "nonsense"], "--device nonsense"),
    ],
)
def test_unusable_arguments_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_run_folder_of_another_run_exits_1(tmp_path, capsys):
    args = ["sample", "--model", "gmm", "-n", "4", "--batch-size", "2", "--no-progress", "--out", str(tmp_path)]
    assert main([*args, "--steps", "3"]) == 0
    assert "4 samples in 2 shards" in capsys.readouterr().out
    assert main([*args, "--steps", "4"]) == 1
    assert "grid: stored" in capsys.readouterr().err
