"""A run folder is data: ``bdia sample/invert --input RUN`` never imports what RUN/manifest.json names, and no
``.py`` file placed beside a run executes, whichever way bdia is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

from bdia import batch
from bdia.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
PLANTED = """
from pathlib import Path
Path({marker!r}).write_text("executed")
from bdia.__main__ import _gmm
def make(*, device, dtype):
    return _gmm(device, dtype, None)
"""


def _bdia(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "bdia", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_model_a_manifest_names_is_not_imported(tmp_path, monkeypatch):
    """A run made with ``--model planted_factory_xyz:make``; the module sits in the run folder, which is the
    current folder: inverting it without --model must not import it (before: it ran, writing the marker)."""
    run, marker = tmp_path / "run", tmp_path / "executed.txt"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "planted_factory_xyz.py").write_text(PLANTED.format(marker=str(tmp_path / "made.txt")))
    monkeypatch.syspath_prepend(str(modules))
    argv = ["sample", "--model", "planted_factory_xyz:make", "--shape", "64", "-n", "2", "--steps", "3"]
    assert main([*argv, "--no-progress", "--out", str(run)]) == 0
    (run / "planted_factory_xyz.py").write_text(PLANTED.format(marker=str(marker)))
    r = _bdia("invert", "--input", ".", "--no-progress", "--out", str(tmp_path / "inv"), cwd=run)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--model is needed: the input run was made with --model planted_factory_xyz:make" in r.stderr
    assert "Traceback" not in r.stderr and not marker.exists() and not (tmp_path / "inv").exists()
    # a built-in model is a name, not code: it is inherited
    assert (
        main(["sample", "--model", "gmm", "-n", "2", "--steps", "3", "--no-progress", "--out", str(tmp_path / "g")])
        == 0
    )
    r = _bdia("invert", "--input", str(tmp_path / "g"), "--no-progress", "--out", str(tmp_path / "gi"), cwd=run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert batch.read_manifest(tmp_path / "gi")["description"]["model"] == "gmm" and not marker.exists()


def test_a_module_placed_beside_a_run_does_not_shadow_what_bdia_imports(tmp_path):
    """``python -m bdia`` puts the current folder first on the import path; bdia imports safetensors lazily, so a
    ``safetensors.py`` in the folder it runs in was executed (before) instead of the package."""
    marker = tmp_path / "executed.txt"
    (tmp_path / "safetensors.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n")
    r = _bdia("sample", "--model", "gmm", "-n", "2", "--steps", "3", "--no-progress", "--out", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not marker.exists()
    assert len(batch.load_dataset(tmp_path / "out").index) == 2
