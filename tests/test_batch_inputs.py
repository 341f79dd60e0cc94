"""bdia.batch on untrusted input: PNG files and run folders (manifests, shards) that are damaged, truncated or
hostile are refused with an error naming the file, before memory is spent on what they claim."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch

from bdia import batch


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def _png(width: int, height: int, idat: bytes, colour: int = 0) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _zeros_deflated(megabytes: int) -> bytes:
    """A zlib stream of ``megabytes`` MiB of zero bytes (about 1 KiB per MiB: deflate's ratio is ~1000:1)."""
    c, block = zlib.compressobj(9), bytes(1 << 20)
    return b"".join([c.compress(block) for _ in range(megabytes)] + [c.flush()])


# ------------------------------------------------------------------------------------------------ PNG


def test_png_bomb_is_refused_after_the_bytes_its_header_announces(tmp_path):
    """An 8 x 8 grey image whose data inflates to 32 MiB: the reader stops one byte past the 72 bytes that the
    header allows, so the peak of the Python heap during the call stays near the file's own size (33 KiB)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(8, 8, _zeros_deflated(32)))
    assert path.stat().st_size < 40_000
    tracemalloc.start()
    try:
        with pytest.raises(batch.DatasetError, match=r"bomb.png: its image data inflates past the 72 bytes"):
            batch.read_png(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # a whole inflation would be 33.5e6


def test_png_header_larger_than_max_pixels_is_refused_before_inflating(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(70_000, 70_000, zlib.compress(b"\0" * 10)))
    with pytest.raises(batch.DatasetError, match=r"huge.png: a 70000 x 70000 image; expected 1 to max_pixels"):
        batch.read_png(path)
    small = tmp_path / "small.png"
    batch.write_png(small, torch.zeros(1, 4, 4))
    assert batch.read_png(small, max_pixels=16).shape == (1, 4, 4)
    with pytest.raises(batch.DatasetError, match="max_pixels=15"):
        batch.read_png(small, max_pixels=15)


def test_damaged_and_truncated_png_name_the_file(tmp_path):
    good = tmp_path / "good.png"
    batch.write_png(good, torch.linspace(-1, 1, 48).reshape(3, 4, 4))
    data = good.read_bytes()
    cases = {
        "cut.png": (data[: len(data) - 20], "cut.png is a truncated PNG"),
        "noend.png": (data[:-12], "noend.png is a truncated PNG"),
        "flipped.png": (data[:45] + bytes([data[45] ^ 1]) + data[46:], "flipped.png is a damaged PNG .its IDAT chunk"),
        "short.png": (_png(4, 4, zlib.compress(b"\0" * 10)), r"short.png: image data has 10 bytes, expected 20"),
        "garbage.png": (_png(4, 4, b"not zlib at all"), "garbage.png is a damaged PNG .its image data does not"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(batch.DatasetError, match=message):
            batch.read_png(tmp_path / name)


# ------------------------------------------------------------------------------------------------ run folders


def _run(folder: Path) -> dict:
    from bdia.models import GaussianMixture
    from bdia.schedules import DiscreteVP
    from bdia.solvers import BDIA, DDIM

    model = GaussianMixture.random(DiscreteVP.stable_diffusion(), dim=4, components=2, std=0.3, seed=0)
    ts = model.schedule.timesteps(3, "trailing")
    batch.sample_dataset(model, ts, BDIA(DDIM(), 1.0), folder, num=5, shape=(4,), shard_size=2, device="cpu")
    return json.loads((folder / batch.MANIFEST).read_text())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"shards": 1e15}, r"shards is 1000000000000000.0, expected ceil\(num / shard_size\) = 3"),
        ({"shards": 10**15}, r"shards is 1000000000000000, expected ceil"),
        ({"num": -3}, r"num is -3, expected an int >= 1"),
        ({"num": "5"}, r'num is "5", expected an int >= 1'),
        ({"num": True}, r"num is true, expected an int >= 1"),
        ({"shard_size": 2.0}, r"shard_size is 2.0, expected an int >= 1"),
        ({"dtype": "load"}, r'dtype is "load", expected one of'),
        ({"grid": ["999", "0"]}, r"grid is .*, expected a list of at least 2 numbers"),
        ({"task": "rm -rf"}, r"task is \"rm -rf\", expected 'sample' or 'invert'"),
        ({"format": "bdia.batch/1"}, r"format is \"bdia.batch/1\", expected 'bdia.batch/2'"),
        ({"description": []}, r"description is \[\], expected an object"),
        ({"num": 10**15, "shard_size": 10**15, "shards": 1}, r"its run id does not match its content"),
    ],
)
def test_hostile_manifest_fields_are_refused_naming_the_file(tmp_path, change, message):
    """Each field is checked before it sizes a loop or an allocation (``shards: 1e15`` once built a set of that
    many numbers), and a manifest whose content no longer matches its run id was edited."""
    folder = tmp_path / "run"
    manifest = _run(folder)
    (folder / batch.MANIFEST).write_text(json.dumps({**manifest, **change}))
    for call in (
        lambda: batch.read_manifest(folder),
        lambda: batch.load_dataset(folder),
        lambda: batch.invert_dataset(None, None, None, tmp_path / "out", input=folder),  # type: ignore[arg-type]
    ):
        with pytest.raises(batch.DatasetError, match="manifest.json: " + message):
            call()


def test_a_consistent_manifest_claiming_more_shards_than_the_folder_holds_costs_nothing(tmp_path):
    """A manifest re-made with a matching run id (anyone can hash it) for 1e15 shards: the missing ones are
    found from the folder's listing, not by counting to 1e15."""
    folder = tmp_path / "run"
    manifest = _run(folder)
    manifest.update(num=10**15, shard_size=1, shards=10**15)
    manifest["run"] = batch._run_id(manifest)
    (folder / batch.MANIFEST).write_text(json.dumps(manifest))
    tracemalloc.start()
    try:
        with pytest.raises(batch.DatasetError, match=r"999999999999997 shard\(s\) missing \(3, 4, 5, 6, 7, 8"):
            batch.load_dataset(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


@pytest.mark.parametrize(
    "content,message",
    [
        (b"{not json", "manifest.json is not valid JSON"),
        (b"\xff\xfe", "manifest.json is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "manifest.json is not valid JSON|manifest.json is not a bdia manifest"),
        (b"[1, 2]", r"manifest.json is not a bdia manifest \(a JSON list"),
    ],
)
def test_unreadable_manifests_name_the_file(tmp_path, content, message):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / batch.MANIFEST).write_bytes(content)
    with pytest.raises(batch.DatasetError, match=message):
        batch.read_manifest(folder)


def test_an_oversized_manifest_is_not_read(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    _run(folder)
    monkeypatch.setattr(batch, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(batch.DatasetError, match=r"manifest.json has \d+ bytes; a bdia manifest has at most 100"):
        batch.read_manifest(folder)
