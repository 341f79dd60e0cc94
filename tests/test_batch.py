"""bdia.batch: shards whose bits do not depend on the process count, the batch split or interruptions; resume
checks; round trips on disk; the PNG reader. Multi-process cases run ``torchrun`` (gloo, CPU, 2 processes)."""

from __future__ import annotations

import hashlib
import io
import math
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("safetensors")

import bdia
from bdia import batch, digits
from bdia.__main__ import main
from bdia.models import GaussianMixture
from bdia.schedules import EDM, DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, Heun

ROOT = Path(__file__).resolve().parent.parent
EPS64, EPS32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
QUIET = "--no-progress"
SMALL = ["--steps", "5", "--batch-size", "6", QUIET]  # 5 steps, shards of 6: seconds on two cores


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def _torchrun(*args: str) -> list[str]:
    # --standalone: a free port of its own, so that concurrent test runs on one machine do not collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bdia", *args]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _shard_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {p.name: load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))}


def _gmm() -> GaussianMixture:
    sd = DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    return GaussianMixture.random(sd, dim=16, components=4, std=0.3, seed=2)


class _Slow:
    """A denoiser that sleeps before each evaluation (the bits are the wrapped model's)."""

    def __init__(self, model, delay: float):
        self.model, self.schedule, self.delay = model, model.schedule, delay

    def __call__(self, x, t, **kw):
        time.sleep(self.delay)
        return self.model(x, t, **kw)

    def __repr__(self) -> str:
        return f"Slow({self.model!r})"


def slow_digits(*, device, dtype):
    """A ``--model tests.test_batch:slow_digits`` factory for the kill test: the digits model slowed down by
    ``BDIA_TEST_DELAY`` seconds per evaluation; each process writes its id to ``BDIA_TEST_PIDS/<rank>.pid``."""
    pids = os.environ.get("BDIA_TEST_PIDS")
    if pids:
        Path(pids, f"{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
    return _Slow(digits.model(dtype=dtype, device=device), float(os.environ.get("BDIA_TEST_DELAY", "0")))


# ------------------------------------------------------------------------------------------------ noise


def test_noise_is_a_function_of_seed_and_index_alone():
    a = batch.noise(3, 17, (2, 4), torch.float64)
    assert torch.equal(a, batch.noise(3, 17, (2, 4), torch.float64))
    assert torch.equal(batch.noise(3, 17, (2, 4)), a.float())  # float32 noise is the float64 draw, rounded
    assert torch.equal(batch.noise(3, 17, (2, 4), torch.float64, scale=2.0), 2 * a)
    # neighbouring seeds and indices do not share draws (seed + index would make (3, 17) equal (4, 16))
    others = [batch.noise(4, 16, (2, 4), torch.float64), batch.noise(3, 18, (2, 4), torch.float64)]
    assert all((o - a).abs().min() > 0 for o in others)
    with pytest.raises(ValueError, match="seed"):
        batch.noise(-1, 0, (2,))
    with pytest.raises(ValueError, match="index"):
        batch.noise(0, 1.0, (2,))


# ------------------------------------------------------------------------------------------------ bits


def test_one_process_and_two_give_the_same_files(tmp_path):
    """The digits model, 24 samples: in-process vs ``torchrun --nproc-per-node 2`` (gloo). Same shard size, so the
    same network batches: every file, manifest included, is the same bytes."""
    args = ["sample", "--model", "digits", "-n", "24", *SMALL]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    r = subprocess.run(
        _torchrun(*args, "--out", str(tmp_path / "two")), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "24 samples in 4 shards" in r.stdout and "2 process(es)" in r.stdout
    one, two = _shard_tensors(tmp_path / "one"), _shard_tensors(tmp_path / "two")
    assert len(one) == 4 and one.keys() == two.keys()
    for name in one:
        assert one[name].keys() == two[name].keys() == {"state.x", "state.x_prev", "index", "cond.labels"}
        assert all(torch.equal(one[name][k], two[name][k]) for k in one[name])
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    data = batch.load_dataset(tmp_path / "two")
    assert torch.equal(data.index, torch.arange(24)) and torch.equal(data.conditions["labels"], torch.arange(24) % 10)


def test_the_library_adds_no_batch_dependence(tmp_path):
    """With a model whose rows are computed independently (the analytic mixture), the shard size (the batch)
    changes no bit either: the noise, the solver and the files are per sample."""
    model, out = _gmm(), {}
    ts = model.schedule.timesteps(6, "trailing")
    labels = torch.tensor([0, 1, 2, 3, -1]).repeat(5)[:23]
    for size in (1, 5, 6, 23):
        s = batch.sample_dataset(
            model, ts, BDIA(DDIM(), 1.0), tmp_path / str(size), num=23, shape=(16,), seed=5, shard_size=size,
            conditions={"labels": labels}, device="cpu",
        )  # fmt: skip
        assert (s.shards, s.computed, s.samples) == (-(-23 // size), -(-23 // size), 23)
        out[size] = batch.load_dataset(tmp_path / str(size))
    for size in (1, 5, 23):
        for key in ("x", "x_prev"):
            assert torch.equal(getattr(out[size].state, key), getattr(out[6].state, key))
    # sample 7 walked alone from noise(seed, 7) gives the same bits as inside its shard
    z = batch.noise(5, 7, (16,))[None]
    one = bdia.sample(model, z, ts, BDIA(DDIM(), 1.0), labels=labels[7:8])
    assert torch.equal(one.x[0], out[6].state.x[7])


def test_fresh_noise_is_scaled_to_the_marginal_at_the_first_time(tmp_path):
    """Under EDM (alpha = 1, sigma = 80 at the start) sample i starts from sqrt(1 + 80^2) noise(seed, i)."""
    model = GaussianMixture.random(EDM(), dim=4, components=2, std=0.5, seed=0)
    ts = EDM().timesteps(4)
    batch.sample_dataset(model, ts, BDIA(Heun(), 1.0), tmp_path, num=3, shape=(4,), seed=9, shard_size=3, device="cpu")
    scale = math.sqrt(1 + 80.0**2)
    z = torch.stack([batch.noise(9, i, (4,), torch.float32, scale) for i in range(3)])
    assert torch.equal(batch.load_dataset(tmp_path).state.x, bdia.sample(model, z, ts, BDIA(Heun(), 1.0)).x)
    assert batch.read_manifest(tmp_path)["source"]["scale"] == scale


def test_kill_one_rank_then_resume_gives_the_uninterrupted_set(tmp_path, monkeypatch):
    """SIGKILL one of two ranks once a shard is on disk, restart (with one process), and compare with a run that
    was never interrupted: the same bytes in every shard, each index once."""
    pids = tmp_path / "pids"
    pids.mkdir()
    args = ["sample", "--model", "tests.test_batch:slow_digits", "--shape", "1,8,8", "-n", "36", *SMALL]
    run = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(
            _torchrun(*args, "--out", str(run)),
            env=_env(BDIA_TEST_DELAY="0.15", BDIA_TEST_PIDS=str(pids)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if run.is_dir() and any(run.glob("shard-*.safetensors")) and (pids / "1.pid").exists():
                    break
                time.sleep(0.02)
            on_disk = len(list(run.glob("shard-*.safetensors")))
            assert proc.poll() is None and 1 <= on_disk < 6, (on_disk, (tmp_path / "log.txt").read_text()[-2000:])
            os.kill(int((pids / "1.pid").read_text()), signal.SIGKILL)
            assert proc.wait(timeout=120) != 0  # torchrun stops the other rank and reports the failure
        finally:
            if proc.poll() is None:
                proc.kill()
    left = {p.name for p in run.glob("shard-*.safetensors")}
    assert 1 <= len(left) < 6, left
    monkeypatch.delenv("BDIA_TEST_PIDS", raising=False)
    monkeypatch.setenv("BDIA_TEST_DELAY", "0")
    assert main([*args, "--out", str(run)]) == 0  # the restart: one process this time
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert _files(run) == _files(tmp_path / "whole")  # no temporary file left behind either
    data = batch.load_dataset(run)
    assert torch.equal(data.index, torch.arange(36))


# ------------------------------------------------------------------------------------------------ resume


def test_resume_skips_finished_shards_and_refuses_another_run(tmp_path):
    model = _gmm()
    ts = model.schedule.timesteps(4, "trailing")
    out = tmp_path / "run"

    def go(**kw):
        args = dict(num=10, shape=(16,), seed=1, shard_size=4, device="cpu")
        return batch.sample_dataset(model, kw.pop("ts", ts), kw.pop("solver", BDIA(DDIM(), 1.0)), out, **{**args, **kw})

    first = go()
    before = _files(out)
    assert (first.shards, first.computed, first.skipped) == (3, 3, 0)
    again = go()
    assert (again.computed, again.skipped, again.samples) == (0, 3, 0) and _files(out) == before
    (out / batch.shard_name(1)).unlink()
    (out / f".{batch.shard_name(1)}.999.tmp").write_bytes(b"half a shard")  # as a killed writer leaves it
    redo = go()
    assert (redo.computed, redo.skipped, redo.samples) == (1, 2, 4) and _files(out) == before
    for change, what in [
        (dict(ts=model.schedule.timesteps(5, "trailing")), "grid"),
        (dict(solver=BDIA(DDIM(), 0.5)), "solver"),
        (dict(solver=EDICT()), "solver"),
        (dict(seed=2), "source"),
        (dict(shard_size=5), "shard_size"),
        (dict(num=11), "num"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(conditions={"labels": torch.full((10,), 2)}), "conditions"),
        (dict(description={"guidance": 2.0}), "description"),
    ]:
        with pytest.raises(batch.DatasetError, match=f"different run(.|\n)*  {what}: stored"):
            go(**change)
    assert _files(out) == before
    # a folder with a manifest and no shard yet (a first try that failed) is simply redefined
    for p in out.glob("shard-*"):
        p.unlink()
    assert go(seed=2).computed == 3


def test_cli_round_trip_on_disk_and_edit(tmp_path):
    """sample -> invert -> sample reproduces the first files to rounding; the inverted latents are the noise the
    samples came from; --class resamples the same pairs under another class."""
    for dtype, eps in (("float64", EPS64), ("float32", EPS32)):
        d = tmp_path / dtype
        assert main(["sample", "--model", "digits", "-n", "12", "--dtype", dtype, *SMALL, "--out", str(d / "s")]) == 0
        assert main(["invert", "--model", "digits", "--input", str(d / "s"), "--out", str(d / "inv"), QUIET]) == 0
        assert main(["sample", "--input", str(d / "inv"), "--out", str(d / "again"), QUIET]) == 0
        first, inv, again = (batch.load_dataset(d / n) for n in ("s", "inv", "again"))
        bound = 100 * 5 * eps  # relative: rounding of 5 exact steps each way, as in the inversion benchmark's tests
        for a, b in ((again.state.x, first.state.x), (again.state.x_prev, first.state.x_prev)):
            assert a.dtype == getattr(torch, dtype) and float((a - b).double().norm() / b.double().norm()) < bound
        assert (again.state.t_prev, again.state.t) == (first.state.t_prev, first.state.t) == (199.0, 0.0)
        z = torch.stack([batch.noise(0, i, (1, 8, 8), getattr(torch, dtype)) for i in range(12)])
        assert float((inv.state.x - z).double().norm() / z.double().norm()) < bound
        assert (inv.state.t_prev, inv.state.t) == (799.0, 999.0)
        assert inv.manifest["source"]["kind"] == "shards" and inv.manifest["task"] == "invert"
        assert torch.equal(again.conditions["labels"], first.conditions["labels"])
    assert main(["sample", "--input", str(d / "inv"), "--class", "3", "--no-progress", "--out", str(d / "edit")]) == 0
    edit = batch.load_dataset(d / "edit")
    assert torch.equal(edit.conditions["labels"], torch.full((12,), 3))
    assert (edit.state.x - first.state.x).abs().max() > 0.1  # other labels, other images
    assert (edit.state.x[3] - first.state.x[3]).abs().max() < (edit.state.x[4] - first.state.x[4]).abs().max()


def test_png_folder_inversion_and_reconstruction(tmp_path):
    """Held-out digits of class 3 as 8-bit PNGs -> invert with --class 3 -> sample: the images come back to
    rounding (BDIA's first plain step from the data is undone exactly by sampling)."""
    x, y = digits.heldout()
    threes = x[y == 3][:8]
    pngs = tmp_path / "png"
    pngs.mkdir()
    for i, img in enumerate(threes):
        batch.write_png(pngs / f"digit_{i:02d}.png", img)
    common = ["--model", "digits", "--class", "3", "--dtype", "float64", *SMALL]
    assert main(["invert", "--input", str(pngs), *common, "--out", str(tmp_path / "inv")]) == 0
    assert main(["sample", "--input", str(tmp_path / "inv"), "--no-progress", "--out", str(tmp_path / "rec")]) == 0
    inv, rec = batch.load_dataset(tmp_path / "inv"), batch.load_dataset(tmp_path / "rec")
    assert inv.names == rec.names == [f"digit_{i:02d}.png" for i in range(8)]
    images = torch.stack([batch.read_png(pngs / n, torch.float64) for n in inv.names])
    assert torch.equal(images, threes.double().clamp(-1, 1).add(1).mul(127.5).round().div(127.5).sub(1))
    assert float((rec.state.x - images).norm() / images.norm()) < 100 * 5 * EPS64
    assert inv.state.x.std() > 0.5  # latents, not images


# ------------------------------------------------------------------------------------------------ PNG reader


def _png(rows: np.ndarray, colour: int, depth: int, filters: list[int], bpp: int) -> bytes:
    """A PNG written with the given filter per row (the forward filters of the PNG specification)."""
    out, prev = [], bytes(rows.shape[1])
    for r, raw in enumerate(rows):
        raw, kind = raw.tobytes(), filters[r % len(filters)]
        enc = bytearray()
        for i, v in enumerate(raw):
            a = raw[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
            enc.append((v - [0, a, b, (a + b) // 2, paeth][kind]) & 255)
        out.append(bytes([kind]) + bytes(enc))
        prev = raw

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    width = rows.shape[1] // bpp
    head = struct.pack(">IIBBBBB", width, rows.shape[0], depth, colour, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.mark.parametrize("colour,depth,channels", [(0, 8, 1), (2, 8, 3), (4, 8, 2), (6, 8, 4), (0, 16, 1), (2, 16, 3)])
def test_read_png_inverts_every_filter(tmp_path, colour, depth, channels):
    rng = np.random.default_rng(colour * 100 + depth)
    h, w, bpp = 7, 5, channels * depth // 8
    pixels = rng.integers(0, 2**depth, size=(h, w, channels)).astype(">u2" if depth == 16 else np.uint8)
    rows = pixels.view(np.uint8).reshape(h, w * bpp)
    path = tmp_path / "a.png"
    path.write_bytes(_png(rows, colour, depth, [0, 1, 2, 3, 4], bpp))
    want = torch.from_numpy(pixels.astype(np.float64)[..., : 3 if channels >= 3 else 1]).permute(2, 0, 1)
    assert torch.equal(batch.read_png(path, torch.float64), want / ((2**depth - 1) / 2) - 1)


def test_read_png_agrees_with_pillow_and_write_png_round_trips(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    yy, xx = np.mgrid[0:24, 0:31]
    grey = ((xx * 7 + yy * 3) % 256).astype(np.uint8)
    grey[::3] = np.random.default_rng(0).integers(0, 256, grey[::3].shape)  # rough rows: Pillow mixes filters
    for mode, arr in [("L", grey), ("RGB", np.stack([grey, grey[::-1], 255 - grey], -1))]:
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, "PNG")
        (tmp_path / f"{mode}.png").write_bytes(buf.getvalue())
        got = batch.read_png(tmp_path / f"{mode}.png", torch.float64)
        want = torch.from_numpy(np.asarray(Image.open(tmp_path / f"{mode}.png")).astype(np.float64))
        want = want[None] if want.dim() == 2 else want.permute(2, 0, 1)
        assert torch.equal(got, want / 127.5 - 1)
        batch.write_png(tmp_path / f"{mode}_again.png", got)
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"{mode}_again.png")), arr)


def test_read_png_refuses_what_it_cannot_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"GIF89a")
    with pytest.raises(batch.DatasetError, match="not a PNG"):
        batch.read_png(tmp_path / "a.png")
    rows = np.zeros((2, 2), np.uint8)
    (tmp_path / "b.png").write_bytes(_png(rows, 3, 8, [0], 1))  # palette
    with pytest.raises(batch.DatasetError, match="unsupported PNG"):
        batch.read_png(tmp_path / "b.png")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        batch.write_png(tmp_path / "c.png", torch.zeros(2, 4, 4))


# ------------------------------------------------------------------------------------------------ errors


def test_bad_arguments_and_folders_are_named(tmp_path, monkeypatch):
    model = _gmm()
    ts = model.schedule.timesteps(3, "trailing")
    solver = BDIA(DDIM(), 1.0)
    kw = dict(shape=(16,), shard_size=4, device="cpu")
    with pytest.raises(ValueError, match="num must be"):
        batch.sample_dataset(model, ts, solver, tmp_path / "a", num=0, **kw)
    with pytest.raises(ValueError, match="shape must be"):
        batch.sample_dataset(model, ts, solver, tmp_path / "a", num=4, shape=(0,), shard_size=4)
    with pytest.raises(ValueError, match="shard_size must be"):
        batch.sample_dataset(model, ts, solver, tmp_path / "a", num=4, shape=(16,), shard_size=0)
    with pytest.raises(ValueError, match=r"conditions\['labels'\] must be a tensor with one row per sample \(4\)"):
        batch.sample_dataset(model, ts, solver, tmp_path / "a", num=4, conditions={"labels": torch.zeros(3)}, **kw)
    with pytest.raises(TypeError, match="float64"):
        batch.sample_dataset(model, ts.float(), solver, tmp_path / "a", num=4, **kw)
    with pytest.raises(batch.DatasetError, match="not a folder"):
        batch.invert_dataset(model, ts, solver, tmp_path / "b", input=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(batch.DatasetError, match="neither"):
        batch.invert_dataset(model, ts, solver, tmp_path / "b", input=tmp_path / "empty")
    pngs = tmp_path / "png"
    pngs.mkdir()
    batch.write_png(pngs / "a.png", torch.zeros(1, 4, 4))
    batch.write_png(pngs / "b.png", torch.zeros(1, 4, 5))
    with pytest.raises(batch.DatasetError, match=r"b.png has shape \(1, 4, 5\)"):
        batch.invert_dataset(model, ts, solver, tmp_path / "b", input=pngs, shard_size=2, device="cpu")
    batch.sample_dataset(model, ts, solver, tmp_path / "s", num=8, **kw)
    with pytest.raises(batch.DatasetError, match="from a run folder"):
        batch.sample_dataset(model, ts, solver, tmp_path / "c", input=pngs)
    with pytest.raises(ValueError, match="keeps its shards"):
        batch.invert_dataset(model, ts, solver, tmp_path / "c", input=tmp_path / "s", shard_size=3)
    with pytest.raises(batch.DatasetError, match="holds torch.float32 latents"):
        batch.invert_dataset(model, ts, solver, tmp_path / "c", input=tmp_path / "s", dtype=torch.float64)
    (tmp_path / "s" / batch.shard_name(1)).unlink()
    for call in (
        lambda: batch.load_dataset(tmp_path / "s"),
        lambda: batch.invert_dataset(model, ts, solver, tmp_path / "c", input=tmp_path / "s", device="cpu"),
    ):
        with pytest.raises(batch.DatasetError, match=r"incomplete: 1 shard\(s\) missing \(1\)"):
            call()
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r'pip install "bdia\[safetensors\]"'):
        batch.load_shard(tmp_path / "s" / batch.shard_name(0))


def test_import_bdia_does_not_import_safetensors_or_batch():
    code = "import sys, bdia; print('safetensors' in sys.modules, 'bdia.batch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr


def test_shard_files_are_named_by_their_content_only(tmp_path):
    """A shard's bytes say which samples it holds and nothing about the process that wrote it."""
    model = _gmm()
    ts = model.schedule.timesteps(3, "trailing")
    batch.sample_dataset(model, ts, BDIA(DDIM(), 1.0), tmp_path, num=5, shape=(16,), shard_size=2, device="cpu")
    shard = batch.load_shard(tmp_path / batch.shard_name(2))
    assert shard.meta == {"run": batch.read_manifest(tmp_path)["run"], "shard": 2, "start": 4, "stop": 5}
    assert (shard.state.t_prev, shard.state.t, shard.state.coupled) == (ts[-2].item(), 0.0, False)
    assert torch.equal(shard.index, torch.tensor([4]))
    digest = hashlib.sha256((tmp_path / batch.shard_name(2)).read_bytes()).hexdigest()
    batch.sample_dataset(model, ts, BDIA(DDIM(), 1.0), tmp_path / "b", num=5, shape=(16,), shard_size=2, device="cpu")
    assert hashlib.sha256((tmp_path / "b" / batch.shard_name(2)).read_bytes()).hexdigest() == digest
