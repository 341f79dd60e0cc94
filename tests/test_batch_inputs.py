"""bdia.batch on untrusted input: PNG files and run folders (manifests, shards) that are damaged, truncated or
hostile are refused with an error naming the file, before memory is spent on what they claim."""

from __future__ import annotations

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
