"""bdia.batch: one folder holds one run (a lock; an id every shard carries), shards verify themselves (checksum,
place, run) on resume and on load, damaged ones are computed again, and shards keep every field of the solver's
state (``State.state_dict``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

import bdia
from bdia import batch
from bdia.__main__ import main
from bdia.exact import Exact, ExactState
from bdia.models import GaussianMixture
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, EDICTState

ROOT = Path(__file__).resolve().parent.parent


def _gmm() -> GaussianMixture:
    sd = DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    return GaussianMixture.random(sd, dim=16, components=4, std=0.3, seed=2)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _sample(out: Path, **kw) -> batch.Summary:
    model = _gmm()
    args = dict(num=10, shape=(16,), seed=1, shard_size=4, device="cpu")
    return batch.sample_dataset(
        model, model.schedule.timesteps(4, "trailing"), BDIA(DDIM(), 1.0), out, **{**args, **kw}
    )


# ------------------------------------------------------------------------------------------------ one run


def test_two_runs_started_into_one_folder_do_not_both_succeed(tmp_path):
    """Run A (seed 0, slowed down) has written its manifest and is computing its first shard when run B (seed 1)
    starts into the same folder: B must be refused (the folder is locked), and A's folder holds A's run only."""
    out = tmp_path / "run"
    common = ["sample", "--model", "tests.test_batch:slow_digits", "--shape", "1,8,8", "-n", "12"]
    common += ["--batch-size", "6", "--steps", "5", "--no-progress", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "BDIA_TEST_DELAY": "0.2"}
    a = subprocess.Popen([sys.executable, "-m", "bdia", *common, "--seed", "0"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / batch.MANIFEST).exists() and a.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.poll() is None and not list(out.glob("shard-*")), "run A ended before run B could start"
        b = main([*common, "--seed", "1"])  # in this process: it starts within milliseconds
        assert a.wait(timeout=120) == 0, a.stderr.read().decode()[-2000:]
    finally:
        if a.poll() is None:
            a.kill()
    assert b != 0  # before the lock, both exited 0 and the folder mixed the two runs' shards
    assert batch.load_dataset(out).manifest["source"]["seed"] == 0
    ref = tmp_path / "ref"
    assert main([*common[:-1], str(ref), "--seed", "0"]) == 0  # run A alone, undisturbed
    assert _files(out) == _files(ref)


def test_a_locked_folder_is_refused_and_a_released_lock_is_not_stale(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    held = batch._lock(out)
    try:
        with pytest.raises(batch.DatasetError, match=r"run is in use by another run"):
            _sample(out)
    finally:
        held.close()
    assert _sample(out).computed == 3  # the lock went with the file that held it


def test_shards_without_a_manifest_and_foreign_files_are_not_taken_over(tmp_path):
    _sample(tmp_path / "a")
    (tmp_path / "a" / batch.MANIFEST).unlink()
    with pytest.raises(batch.DatasetError, match="holds shard files but no manifest.json"):
        _sample(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / batch.MANIFEST).write_text('{"name": "some other tool"}')
    with pytest.raises(batch.DatasetError, match="format is null"):
        _sample(tmp_path / "b")
    assert json.loads((tmp_path / "b" / batch.MANIFEST).read_text()) == {"name": "some other tool"}
    (tmp_path / "c").write_text("a file")
    with pytest.raises(ValueError, match="out .* is a file; expected a run folder"):
        _sample(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ verification


def test_truncated_and_altered_shards_are_computed_again_on_resume(tmp_path):
    out = tmp_path / "run"
    _sample(out)
    whole = _files(out)
    one, two = out / batch.shard_name(1), out / batch.shard_name(2)
    one.write_bytes(whole[one.name][:-30])  # truncated (a copy that stopped, a full disk)
    data = bytearray(whole[two.name])
    data[-5] ^= 0x40  # one bit of one latent
    two.write_bytes(bytes(data))
    for path, message in ((one, "is damaged or not a safetensors file"), (two, "does not match the checksum")):
        with pytest.raises(batch.DatasetError, match=f"{path.name} {message}" if path == one else message):
            batch.load_dataset(out)
        path.write_bytes(whole[path.name])
    one.write_bytes(whole[one.name][:-30])
    two.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _sample(out)
    assert (again.computed, again.skipped) == (2, 1)  # before: both counted as done, the folder unreadable
    assert sorted(str(w.message).split("/")[-1].split(" ")[0] for w in caught) == [one.name, two.name]
    assert _files(out) == whole


def test_load_checks_each_shard_against_its_place_and_its_run(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    _sample(out)
    _sample(other, seed=2)
    whole = _files(out)
    (out / batch.shard_name(1)).write_bytes(whole[batch.shard_name(0)])  # shard 0's file in shard 1's place
    with pytest.raises(batch.DatasetError, match=r"shard-000001.safetensors holds shard 0 \(samples 0..3\), not 1"):
        batch.load_dataset(out)
    (out / batch.shard_name(1)).write_bytes((other / batch.shard_name(1)).read_bytes())  # another run's shard 1
    with pytest.raises(batch.DatasetError, match="shard-000001.safetensors belongs to another run"):
        batch.load_dataset(out)
    with pytest.raises(batch.DatasetError, match="shard-000001.safetensors and 0 other shard.s. belong to another"):
        _sample(out)  # not overwritten: it is another run's data
    assert (out / batch.shard_name(1)).read_bytes() == (other / batch.shard_name(1)).read_bytes()
    assert batch.load_shard(out / batch.shard_name(1)).meta["run"] == batch.read_manifest(other)["run"]


def test_an_edited_manifest_is_refused(tmp_path):
    out = tmp_path / "run"
    _sample(out)
    m = json.loads((out / batch.MANIFEST).read_text())
    m["source"]["seed"] = 7  # as if the run had been made with another seed
    (out / batch.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(batch.DatasetError, match="manifest.json: its run id does not match its content"):
        batch.load_dataset(out)
    m["info"] = {"input": "moved"}  # info is not part of the run: editing it is harmless
    m["source"]["seed"] = 1
    (out / batch.MANIFEST).write_text(json.dumps(m))
    assert batch.load_dataset(out).manifest["info"] == {"input": "moved"}


# ------------------------------------------------------------------------------------------------ state fields


def test_shards_keep_every_field_of_the_solvers_state(tmp_path):
    """EDICT(alternate=True) over an odd number of steps: the stored state keeps its parity (``odd``), so the
    inversion from the shards is the in-memory inversion, to the bit (before: a plain coupled State, even)."""
    model = _gmm()
    ts = model.schedule.timesteps(5, "trailing")
    solver = EDICT(DDIM(), alternate=True)
    batch.sample_dataset(model, ts, solver, tmp_path / "s", num=6, shape=(16,), seed=3, shard_size=4, device="cpu")
    z = torch.stack([batch.noise(3, i, (16,)) for i in range(6)])
    walked = bdia.sample(model, z, ts, solver)
    data = batch.load_dataset(tmp_path / "s")
    assert isinstance(walked, EDICTState) and type(data.state) is EDICTState and data.state.odd == walked.odd
    assert data.state.state_dict().keys() == walked.state_dict().keys()
    assert torch.equal(data.state.x, walked.x) and torch.equal(data.state.x_prev, walked.x_prev)
    batch.invert_dataset(model, ts, solver, tmp_path / "inv", input=tmp_path / "s", device="cpu")
    back = bdia.invert(model, walked, ts, solver)
    inv = batch.load_dataset(tmp_path / "inv").state
    assert torch.equal(inv.x, back.x) and torch.equal(inv.x_prev, back.x_prev) and inv.odd == back.odd


def test_exact_states_keep_their_integers_in_shards(tmp_path):
    """An exact run's shards hold ExactState with its integers; inverting from them gives the noise to the bit."""
    model = _gmm()
    ts = model.schedule.timesteps(4, "trailing")
    solver = Exact(BDIA(DDIM(), 0.5))
    batch.sample_dataset(model, ts, solver, tmp_path / "s", num=5, shape=(16,), seed=4, shard_size=3, device="cpu")
    shard = batch.load_shard(tmp_path / "s" / batch.shard_name(1))
    z = torch.stack([batch.noise(4, i, (16,)) for i in range(3, 5)])
    walked = bdia.sample(model, z, ts, solver)
    assert isinstance(shard.state, ExactState) and torch.equal(shard.state.fixed.X, walked.fixed.X)
    batch.invert_dataset(model, ts, solver, tmp_path / "inv", input=tmp_path / "s", device="cpu")
    inv = batch.load_shard(tmp_path / "inv" / batch.shard_name(1)).state
    assert torch.equal(inv.x, bdia.invert(model, walked, ts, solver).x)
    # every part of an exact state is per sample (its diagnostic peak too), so the shards join into one state
    whole = batch.load_dataset(tmp_path / "s").state
    everything = bdia.sample(model, torch.stack([batch.noise(4, i, (16,)) for i in range(5)]), ts, solver)
    assert torch.equal(whole.fixed.X, everything.fixed.X) and torch.equal(whole.fixed.buffer, everything.fixed.buffer)
    assert torch.equal(whole.fixed.peak, everything.fixed.peak)


def test_two_ranks_verify_and_recompute_damaged_shards_between_them(tmp_path):
    """A resume under ``torchrun --nproc-per-node 2``: shard k is checked by rank k mod 2, the verdicts are shared,
    and the damaged shards (one for each rank) are computed again: the folder is the undamaged run's, bytes and
    all."""
    out = tmp_path / "run"
    args = ["sample", "--model", "gmm", "-n", "10", "--batch-size", "2", "--steps", "3", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    whole = _files(out)
    for k in (1, 2):
        path = out / batch.shard_name(k)
        path.write_bytes(whole[path.name][: len(whole[path.name]) // 2])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bdia"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*cmd, *args, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "4 samples in 2 shards" in r.stdout and "(3 of 5 shards were there already)" in r.stdout
    assert r.stderr.count("is damaged") == 2  # one warning from each rank's share
    assert _files(out) == whole
