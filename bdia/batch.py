"""Data-parallel sampling and inversion: a data set of samples, or of exact latents, written as shards on disk.

A run is a fixed list of *shards*: consecutive sample indices, ``shard_size`` of them (the last may be shorter).
Each shard is one batch through ``bdia.sample`` or ``bdia.invert`` (BDIA, Zhang, Lewis & Kleijn, ECCV 2024, or
any solver of ``bdia.solvers``), written atomically (a hidden temporary file, then a rename) as a safetensors file
holding the walk's final state (``State.state_dict``: the pair and every field the solver's state adds), the
sample indices, the conditioning and a checksum of it all. Sample ``i`` starts from noise drawn by its own
generator, seeded by ``(seed, i)`` (``noise``), so which process ran a shard, how many processes there were and
whether the run was interrupted cannot change a bit.

Processes are ``torch.distributed`` ranks (one per GPU, launched by ``torchrun``; gloo on CPU, nccl on CUDA). Rank
``r`` of ``W`` takes the missing shards ``r, r + W, ...``. Without a process group (or with one process) everything
runs in-process. One folder holds one run: rank 0 locks it for the run's duration and writes ``manifest.json``
(the run's definition: source, grid, model, solver, dtype, conditioning, versions, and its id, the hash of all
that) before any shard; every rank checks it. A restarted run verifies the shards already there (checksum, place,
run id), computes again those that are damaged and refuses to continue a run that was defined differently.
See docs/scale.md.

Inputs are a folder of shards (a sampled set is inverted from its exact pairs; an inverted set is sampled from its
pairs, e.g. under a new class) or a folder of PNG images (decoded here, with the standard library and numpy).
A run folder is data: nothing is unpickled (shards are safetensors, the manifest is JSON) or imported, and every
number read from disk is checked before it sizes anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bdia.models import Denoiser
from bdia.sampling import check, invert, sample
from bdia.schedules import check_grid
from bdia.state import State, _flatten, _unflatten

__all__ = [
    "FORMAT",
    "Dataset",
    "DatasetError",
    "Refused",
    "Shard",
    "Summary",
    "default_device",
    "invert_dataset",
    "load_dataset",
    "load_shard",
    "noise",
    "read_manifest",
    "read_png",
    "sample_dataset",
    "shard_name",
    "write_png",
]

FORMAT = "bdia.batch/2"
MANIFEST = "manifest.json"
LOCK = ".bdia.lock"  # held (flock) by the rank 0 of the run writing the folder
MAX_MANIFEST_BYTES = 1 << 24
_SHARD = re.compile(r"shard-(\d{6,})\.safetensors")
_STATE, _COND = "state", "cond."  # prefixes of the state's tensors and of the conditioning in a shard file
_SHARD_META = "bdia.shard"
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


class DatasetError(ValueError):
    """A run folder or input that cannot be used as asked: a manifest of another run, missing shards, bad files."""


class Refused(ValueError):
    """A shard's walk refused by ``bdia.sampling.check`` before any network call (its settings, or its input:
    a state from another grid or solver, a non-finite latent); the cause is the library's own error."""


# ------------------------------------------------------------------------------------------------ noise


def noise(
    seed: int, index: int, shape: Sequence[int], dtype: torch.dtype = torch.float32, scale: float = 1.0
) -> torch.Tensor:
    """Sample ``index``'s starting noise, ``scale * N(0, I)`` of ``shape``: drawn in float64 on the CPU by a
    generator seeded from ``(seed, index)`` alone, then cast to ``dtype``, so it does not depend on batching,
    on the process or on the dtype beyond its rounding."""
    for name, v in (("seed", seed), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    # a hash, not seed + index: runs with neighbouring seeds must not share noise at shifted indices
    digest = hashlib.sha256(f"bdia.batch.noise:{seed}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    return (z * scale).to(dtype)


# ------------------------------------------------------------------------------------------------ PNG


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> samples per pixel (grey, RGB, grey + alpha, RGBA)


MAX_PIXELS = 2**26  # read_png's default limit: 8192 x 8192 pixels


def read_png(path: str | Path, dtype: torch.dtype = torch.float32, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """A PNG image as a ``(C, H, W)`` tensor in [-1, 1] (``v / (max / 2) - 1``), C = 1 (grey) or 3 (RGB).

    Reads non-interlaced 8- and 16-bit grey, grey + alpha, RGB and RGBA (alpha is dropped); anything else
    (palette, fewer than 8 bits, interlaced) is refused with a message. The file is untrusted data: the chunks'
    CRCs are checked, an image of more than ``max_pixels`` pixels is refused before its data is inflated, and the
    data is inflated incrementally up to the size its header announces, so a small file cannot claim memory
    (a decompression bomb is refused after at most that many bytes)."""
    path = Path(path)
    data = path.read_bytes()
    if not data.startswith(_PNG_SIGNATURE):
        raise DatasetError(f"{path} is not a PNG file")
    pos, header, idat = len(_PNG_SIGNATURE), None, []
    while True:
        if pos + 12 > len(data):
            raise DatasetError(f"{path} is a truncated PNG (no IEND chunk)")
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        if pos + 12 + length > len(data):
            raise DatasetError(f"{path} is a truncated PNG (its {tag!r} chunk runs past the end of the file)")
        body = data[pos + 8 : pos + 8 + length]
        if tag in (b"IHDR", b"IDAT"):  # the chunks this reader uses: a damaged one must not decode to wrong pixels
            (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
            if zlib.crc32(tag + body) != crc:
                raise DatasetError(f"{path} is a damaged PNG (its {tag.decode()} chunk fails its CRC)")
        pos += 12 + length  # length, tag, body, CRC
        if tag == b"IHDR":
            if header is not None or length != 13:
                raise DatasetError(f"{path} is a damaged PNG (a second IHDR chunk, or one of {length} bytes)")
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        elif tag == b"IEND":
            break
    if header is None or not idat:
        raise DatasetError(f"{path} is a truncated PNG (no IHDR or IDAT chunk)")
    width, height, depth, colour, _, _, interlace = header
    channels = _PNG_CHANNELS.get(colour)
    if channels is None or depth not in (8, 16) or interlace:
        raise DatasetError(
            f"{path}: unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}); "
            "expected non-interlaced 8- or 16-bit grey, grey + alpha, RGB or RGBA"
        )
    if not (1 <= width and 1 <= height and width * height <= max_pixels):
        raise DatasetError(f"{path}: a {width} x {height} image; expected 1 to max_pixels={max_pixels} pixels")
    bpp = channels * depth // 8  # bytes per pixel: the distance the filters look back
    stride = width * bpp
    expected = height * (stride + 1)
    inflate, raw = zlib.decompressobj(), bytearray()
    try:
        for body in idat:  # at most one byte more than the header allows, however far the data would inflate
            raw += inflate.decompress(body, expected + 1 - len(raw))
            if len(raw) > expected:
                raise DatasetError(
                    f"{path}: its image data inflates past the {expected} bytes its header ({width} x {height}, "
                    f"{channels} channel(s) of {depth} bits) announces"
                )
    except zlib.error as e:
        raise DatasetError(f"{path} is a damaged PNG (its image data does not inflate: {e})") from e
    if not inflate.eof or len(raw) != expected:
        raise DatasetError(f"{path}: image data has {len(raw)} bytes, expected {expected} (a truncated PNG)")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    out = np.empty((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for r in range(height):
        kind, line = int(rows[r, 0]), rows[r, 1:]
        if kind == 0:
            cur = line
        elif kind == 1:  # Sub: each byte adds the reconstructed byte one pixel left, i.e. a running sum mod 256
            cur = (line.reshape(width, bpp).astype(np.int64).cumsum(axis=0) % 256).astype(np.uint8).ravel()
        elif kind == 2:  # Up
            cur = line + prev  # uint8 arithmetic wraps mod 256, as the filter does
        elif kind in (3, 4):  # Average, Paeth: each byte needs the reconstructed one to its left
            cur = np.frombuffer(_unfilter_sequential(kind, line.tobytes(), prev.tobytes(), bpp), dtype=np.uint8)
        else:
            raise DatasetError(f"{path}: unknown PNG filter type {kind} on row {r}")
        out[r] = cur
        prev = out[r]
    pixels = (out.view(">u2") if depth == 16 else out).reshape(height, width, channels)
    pixels = pixels[..., : 3 if channels >= 3 else 1]
    x = torch.from_numpy(pixels.astype(np.float64)).permute(2, 0, 1)
    return (x / ((2**depth - 1) / 2) - 1.0).to(dtype)  # v / 127.5 - 1 for 8 bits: one rounding


def _unfilter_sequential(kind: int, line: bytes, prev: bytes, bpp: int) -> bytearray:
    cur = bytearray(line)
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (cur[i] + ((a + b) >> 1)) & 255
            continue
        c = prev[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return cur


def write_png(path: str | Path, image: torch.Tensor) -> None:
    """Write a ``(C, H, W)`` image in [-1, 1] (C = 1 or 3) as an 8-bit PNG, the inverse of ``read_png`` up to
    rounding to 256 levels (values outside [-1, 1] are clipped)."""
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (C, H, W) tensor with C = 1 or 3, got {got}")
    c, h, w = image.shape
    v = ((image.detach().cpu().double().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    rows = v.permute(1, 2, 0).reshape(h, w * c).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 (None) on every row

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    Path(path).write_bytes(
        _PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------------------------ files


def _safetensors() -> Any:
    """The ``safetensors`` package, imported on first use: an optional dependency."""
    try:
        import safetensors
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            'bdia.batch writes and reads shards as safetensors files: pip install "bdia[safetensors]"'
        ) from e
    return safetensors


def shard_name(k: int) -> str:
    """The file name of shard ``k`` in a run folder."""
    return f"shard-{k:06d}.safetensors"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` under a hidden temporary name, flush it to the disk, then rename: a reader (or a restarted
    run) sees the whole file or none of it, even if this process is killed half-way. A failed write (a full
    disk) leaves no temporary file and names the file it was for."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e


def _shard_files(folder: Path) -> set[int]:
    """The shard numbers of the shard files in ``folder`` (names as ``shard_name`` writes them): bounded by what
    is on disk, whatever a manifest claims."""
    with os.scandir(folder) as it:
        found = {int(m.group(1)) for e in it if (m := _SHARD.fullmatch(e.name))}
    return {k for k in found if (folder / shard_name(k)).is_file()}


def _missing_message(folder: Path, count: int, found: set[int]) -> str | None:
    """None when shards ``0..count-1`` are all in ``found``, else a message naming the first missing ones
    (found in at most ``len(found) + 10`` look-ups, not ``count``)."""
    present = sum(1 for k in found if k < count)
    if present == count:
        return None
    first = list(itertools.islice((k for k in range(count) if k not in found), 10))
    shown = ", ".join(map(str, first)) + (" ..." if count - present > len(first) else "")
    return f"{folder} is incomplete: {count - present} shard(s) missing ({shown}); rerun the command that made it"


def _checksum(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> str:
    """sha256 of a shard's content: its metadata (all but the checksum) and every tensor's name, dtype, shape and
    bytes."""
    h = hashlib.sha256()
    fields = {k: v for k, v in info.items() if k != "sha256"}
    h.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _shard_bytes(
    run: str, k: int, lo: int, hi: int, state: State, conds: dict[str, torch.Tensor], extra: dict[str, Any]
) -> bytes:
    """A shard file: the state as ``state_dict`` gives it (every field a solver's state has: tensors under
    ``state.``, the rest in the metadata, laid out as ``bdia.state.save`` lays them out), ``index``,
    ``cond.<name>``, and a checksum of it all. One metadata entry (safetensors stores several in no fixed order)."""
    tensors: dict[str, torch.Tensor] = {}
    state_meta = _flatten(state.state_dict(), _STATE, tensors)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    tensors["index"] = torch.arange(lo, hi, dtype=torch.int64)
    tensors.update({_COND + n: v.detach().cpu().contiguous() for n, v in conds.items()})
    # nothing about the process goes in: the same shard has the same bytes whichever rank wrote it
    info = {"run": run, "shard": k, "start": lo, "stop": hi, **extra, "state": state_meta}
    info["sha256"] = _checksum(tensors, info)
    return _safetensors().torch.save(tensors, metadata={_SHARD_META: json.dumps(info)})


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file: the walk's final ``state`` for samples ``index``, their ``conditions`` (model keywords,
    one row per sample) and its metadata ``meta`` (the run's id, shard number, index range, PNG file names for
    images)."""

    state: State
    index: torch.Tensor
    conditions: dict[str, torch.Tensor]
    meta: dict[str, Any]


class _ForeignShard(DatasetError):
    """A whole shard that another run wrote."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_shard(path: str | Path, device: torch.device | str = "cpu", *, run: str | None = None) -> Shard:
    """Read one shard file written by ``sample_dataset`` / ``invert_dataset`` (safetensors: nothing is unpickled),
    checking it against its own checksum (a truncated or altered file is an error naming it), its index against
    its rows, and, given ``run`` (a manifest's ``run``), that it belongs to that run. The state is the one that
    was written, of its own type (``State.from_state_dict``: e.g. EDICT's parity, exact states' integers)."""
    path = Path(path)
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (st.SafetensorError, OSError) as e:
        raise DatasetError(f"{path} is damaged or not a safetensors file ({e})") from e
    if _SHARD_META not in meta:
        raise DatasetError(f"{path} is not a bdia shard (no {_SHARD_META!r} metadata)")
    try:
        info = json.loads(meta[_SHARD_META])
    except (ValueError, RecursionError) as e:
        raise DatasetError(f"{path} is damaged: its {_SHARD_META!r} metadata is not JSON ({e})") from e
    if not isinstance(info, dict) or _checksum(tensors, info) != info.get("sha256"):
        raise DatasetError(f"{path} is damaged: its content does not match the checksum it was written with")
    try:
        state = State.from_state_dict(_unflatten(info.pop("state"), tensors))
    except (ValueError, TypeError, KeyError, RecursionError) as e:
        raise DatasetError(f"{path} holds no readable bdia state ({type(e).__name__}: {e})") from e
    del info["sha256"]
    if not (
        isinstance(info.get("run"), str)
        and all(_is_int(info.get(k)) for k in ("shard", "start", "stop"))
        and 0 <= info["start"] < info["stop"]
    ):
        raise DatasetError(f"{path}: its shard metadata is not a bdia shard's (run, shard, start < stop)")
    rows = info["stop"] - info["start"]
    index = tensors.get("index")
    if index is None or index.dtype != torch.int64 or index.shape != (rows,):
        raise DatasetError(f"{path} lacks an int64 index of its {rows} samples")
    if not torch.equal(index, torch.arange(info["start"], info["stop"])):
        raise DatasetError(f"{path}: its index is not the samples {info['start']}..{info['stop'] - 1} it claims")
    conds = {k[len(_COND) :]: v for k, v in tensors.items() if k.startswith(_COND)}
    for what, t in [("state.x", state.x), *((f"cond.{k}", v) for k, v in conds.items())]:
        if t.dim() < 1 or t.shape[0] != rows:
            raise DatasetError(f"{path}: {what} has shape {tuple(t.shape)}, expected {rows} rows (one per sample)")
    names = info.get("names")
    if names is not None and not (
        isinstance(names, list) and len(names) == rows and all(isinstance(n, str) for n in names)
    ):
        raise DatasetError(f"{path}: its image names are not {rows} strings")
    if run is not None and info["run"] != run:
        raise _ForeignShard(f"{path} belongs to another run (run {info['run'][:16]}, this folder's {run[:16]})")
    if torch.device(device).type != "cpu":
        state = state.to(device)
        index, conds = index.to(device), {k: v.to(device) for k, v in conds.items()}
    return Shard(state, index, conds, info)


def _load_checked(folder: Path, k: int, lo: int, hi: int, manifest: dict[str, Any]) -> Shard:
    """Shard ``k`` of the run ``manifest`` describes: its own, in its place (samples ``lo..hi-1``), in its dtype."""
    path = folder / shard_name(k)
    shard = load_shard(path, run=manifest["run"])
    got = (shard.meta["shard"], shard.meta["start"], shard.meta["stop"])
    if got != (k, lo, hi):
        raise DatasetError(f"{path} holds shard {got[0]} (samples {got[1]}..{got[2] - 1}), not {k} ({lo}..{hi - 1})")
    if str(shard.state.x.dtype).removeprefix("torch.") != manifest["dtype"]:
        raise DatasetError(f"{path} holds {shard.state.x.dtype} latents, the run {manifest['dtype']}")
    return shard


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A whole run folder read back: one ``State`` for all samples in index order, their conditioning, the PNG
    file names (for inverted images, else None) and the manifest."""

    state: State
    index: torch.Tensor
    conditions: dict[str, torch.Tensor]
    names: list[str] | None
    manifest: dict[str, Any]


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a run folder: what the run was (task, grid, model, solver, ...), as a dict,
    checked: its fields have the types and ranges a manifest's have, and its ``run`` id matches its content."""
    return _read_manifest(Path(folder))


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{folder} is not a bdia run folder (no {MANIFEST})")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise DatasetError(f"{path} has {size} bytes; a bdia manifest has at most {MAX_MANIFEST_BYTES}")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise DatasetError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from e
    _check_fields(manifest, path)
    return manifest


def _check_fields(m: Any, path: Path) -> None:
    """A manifest read from disk is data of unknown origin: check every field this module uses before any of it
    sizes a loop or an allocation."""

    def bad(key: str, expected: str) -> DatasetError:
        text = json.dumps(m.get(key))
        return DatasetError(f"{path}: {key} is {text[:80]}{' ...' if len(text) > 80 else ''}, expected {expected}")

    if not isinstance(m, dict):
        raise DatasetError(f"{path} is not a bdia manifest (a JSON {type(m).__name__}, not an object)")
    if m.get("format") != FORMAT:
        raise bad("format", repr(FORMAT))
    if m.get("task") not in ("sample", "invert"):
        raise bad("task", "'sample' or 'invert'")
    for key in ("num", "shard_size"):
        if not _is_int(m.get(key)) or m[key] < 1:
            raise bad(key, "an int >= 1")
    if m.get("shards") != -(-m["num"] // m["shard_size"]):
        raise bad("shards", f"ceil(num / shard_size) = {-(-m['num'] // m['shard_size'])}")
    if m.get("dtype") not in _DTYPES:
        raise bad("dtype", f"one of {sorted(_DTYPES)}")
    grid = m.get("grid")
    if not (
        isinstance(grid, list)
        and len(grid) >= 2
        and all(isinstance(t, float | int) and not isinstance(t, bool) for t in grid)
    ):
        raise bad("grid", "a list of at least 2 numbers")
    for key in ("source", "conditions", "description", "environment"):
        if not isinstance(m.get(key), dict):
            raise bad(key, "an object")
    if m.get("run") != _run_id(m):
        raise DatasetError(f"{path}: its run id does not match its content (the manifest was edited or damaged)")


def _run_id(manifest: Mapping[str, Any]) -> str:
    """A run's identity: the hash of its definition (every field but ``run`` itself and ``info``), so the same run
    has the same id on every rank, and every shard it writes carries it."""
    definition = {k: v for k, v in manifest.items() if k not in ("run", "info")}
    return hashlib.sha256(json.dumps(definition, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _ranges(num: int, shard_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + shard_size, num)) for lo in range(0, num, shard_size)]


def load_dataset(folder: str | Path, device: torch.device | str = "cpu") -> Dataset:
    """Read every shard of a finished run, each checked against its checksum, its place in the run (shard
    number, sample indices, rows) and the run's id; returns their states joined into one (per-sample tensors,
    which ``State.__getitem__`` slices, are concatenated; every other field must agree)."""
    folder = Path(folder)
    manifest = _read_manifest(folder)
    message = _missing_message(folder, manifest["shards"], _shard_files(folder))
    if message:
        raise DatasetError(message)
    ranges = _ranges(manifest["num"], manifest["shard_size"])  # as many as the shard files on disk, at most
    shards = [_load_checked(folder, k, lo, hi, manifest) for k, (lo, hi) in enumerate(ranges)]
    state = _joined([s.state for s in shards], folder)
    keys = shards[0].conditions.keys()
    for k, s in enumerate(shards):
        if s.conditions.keys() != keys:
            raise DatasetError(
                f"{folder / shard_name(k)} has conditions {sorted(s.conditions)}, shard 0 {sorted(keys)}"
            )
    conds = {k: torch.cat([s.conditions[k] for s in shards]) for k in keys}
    names = [n for s in shards for n in s.meta["names"]] if "names" in shards[0].meta else None
    index = torch.cat([s.index for s in shards])
    if torch.device(device).type != "cpu":
        state, index, conds = state.to(device), index.to(device), {k: v.to(device) for k, v in conds.items()}
    return Dataset(state, index, conds, names, manifest)


def _joined(states: list[State], folder: Path) -> State:
    """One state from the shards' states, through ``state_dict`` (so every field of every kind of state is
    kept): the tensors that ``state[:0]`` empties are per sample and concatenated; all else must agree."""
    parts = []
    for s in states:
        tensors: dict[str, torch.Tensor] = {}
        empty: dict[str, torch.Tensor] = {}
        meta = _flatten(s.state_dict(), "", tensors)
        _flatten(s[:0].state_dict(), "", empty)
        rows = {k for k, t in tensors.items() if k in empty and empty[k].shape != t.shape}
        parts.append((meta, tensors, rows))
    meta0, tensors0, rows0 = parts[0]
    for k, (meta, tensors, rows) in enumerate(parts[1:], 1):
        differ = sorted(key for key in {**meta0, **meta} if meta.get(key) != meta0.get(key))
        differ += sorted(
            n for n in tensors0.keys() - rows0 if n not in tensors or not torch.equal(tensors[n], tensors0[n])
        )
        if differ or rows != rows0 or tensors.keys() != tensors0.keys():
            raise DatasetError(
                f"{folder}: the states of shards 0 and {k} differ in {', '.join(differ) or 'their tensors'}, which "
                "are not per sample, so they do not join into one state: read the shards with load_shard"
            )
    joined = {n: torch.cat([p[1][n] for p in parts]) if n in rows0 else t for n, t in tensors0.items()}
    return State.from_state_dict(_unflatten(meta0, joined))


# ------------------------------------------------------------------------------------------------ sources


class _Noise:
    """Fresh samples: sample ``i`` starts from ``noise(seed, i)`` at the grid's first time."""

    def __init__(self, num: int, shape: Sequence[int], seed: int, scale: float, dtype: torch.dtype):
        self.num, self.shape, self.seed, self.scale, self.dtype = num, tuple(shape), seed, scale, dtype
        self.shard_size: int | None = None  # free: the caller's

    def describe(self) -> dict[str, Any]:
        return {"kind": "noise", "seed": self.seed, "shape": list(self.shape), "scale": self.scale}

    def read(self, k: int, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        x = torch.stack([noise(self.seed, i, self.shape, self.dtype, self.scale) for i in range(lo, hi)])
        return x, {}, {}


class _Shards:
    """The shards of an earlier run: its output shard ``k`` is this run's input shard ``k`` (same batches),
    each checked (checksum, place, run id) as it is read."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.folder = folder
        self.manifest = _read_manifest(folder)
        self.num, self.shard_size = self.manifest["num"], self.manifest["shard_size"]
        message = _missing_message(folder, self.manifest["shards"], _shard_files(folder))
        if message:
            raise DatasetError(message)
        stored = _DTYPES[self.manifest["dtype"]]
        if dtype is not None and dtype != stored:
            raise DatasetError(f"{folder} holds {stored} latents but dtype={dtype} was asked for; convert them first")
        self.dtype = stored

    def describe(self) -> dict[str, Any]:
        return {"kind": "shards", "task": self.manifest["task"], "run": self.manifest["run"]}

    def read(self, k: int, lo: int, hi: int) -> tuple[State, dict[str, torch.Tensor], dict[str, Any]]:
        shard = _load_checked(self.folder, k, lo, hi, self.manifest)
        extra = {"names": shard.meta["names"]} if "names" in shard.meta else {}
        return shard.state, shard.conditions, extra


class _Images:
    """A folder of PNG images, in sorted file-name order: sample ``i`` is the ``i``-th file."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.folder = folder
        self.files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not self.files:
            raise DatasetError(f"{folder} holds neither a {MANIFEST} (a run folder) nor PNG images")
        self.num, self.shard_size = len(self.files), None
        self.dtype = dtype or torch.float32
        self.shape = tuple(read_png(self.files[0]).shape)
        h = hashlib.sha256()
        for p in self.files:  # names and sizes: cheap on every rank, and catches added, removed or renamed files
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())
        self.digest = h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": "png", "shape": list(self.shape), "files_sha256": self.digest}

    def read(self, k: int, lo: int, hi: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        images = []
        for p in self.files[lo:hi]:
            x = read_png(p, self.dtype)
            if tuple(x.shape) != self.shape:
                raise DatasetError(f"{p} has shape {tuple(x.shape)}, the folder's first image {self.shape}")
            images.append(x)
        return torch.stack(images), {}, {"names": [p.name for p in self.files[lo:hi]]}


def _input(folder: str | Path, dtype: torch.dtype | None) -> _Shards | _Images:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"input {folder} is not a folder")
    return _Shards(folder, dtype) if (folder / MANIFEST).exists() else _Images(folder, dtype)


# ------------------------------------------------------------------------------------------------ processes


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` (torchrun's local rank, 0 without torchrun) when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local} but this host has {torch.cuda.device_count()} CUDA device(s): start at most one "
            "process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local)


class _Group:
    """This process's place among the ranks: the default process group, one made from torchrun's environment
    (``WORLD_SIZE`` > 1) and destroyed again by ``close``, or a world of one."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist, self.created = dist, False
        ready = dist.is_available() and dist.is_initialized()
        if not ready and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.created = ready = True
        self.active = ready and dist.get_world_size() > 1
        self.rank = dist.get_rank() if ready else 0
        self.world = dist.get_world_size() if ready else 1
        # collectives of the nccl backend take CUDA tensors only
        self.nccl = ready and dist.get_backend() == "nccl"

    def barrier(self) -> None:
        if self.active:
            if self.nccl:
                self.dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                self.dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device="cuda" if self.nccl else "cpu")
        self.dist.all_reduce(t)
        return t.tolist()

    def close(self) -> None:
        if self.created:
            self.dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the run


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a call did, over all ranks: ``shards`` in the data set, ``computed`` by this call and ``skipped``
    (already on disk), ``samples`` computed, wall ``seconds`` between the start and end barriers, and time
    summed over ranks spent in shards (``busy_seconds``), in writing them (``write_seconds``) and the CPU time
    the ranks used in shards (``cpu_seconds``: below ``busy_seconds`` when they waited for a device or for a
    core that other work held, above it with several threads per rank)."""

    out: Path
    shards: int
    computed: int
    skipped: int
    samples: int
    world_size: int
    seconds: float
    busy_seconds: float
    write_seconds: float
    cpu_seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.nan

    @property
    def write_share(self) -> float:
        """The share of the ranks' time in shards spent serialising, writing and renaming them."""
        return self.write_seconds / self.busy_seconds if self.busy_seconds > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """The fields and figures as JSON values (a figure with nothing to measure, NaN, is None)."""
        d = {**dataclasses.asdict(self), "samples_per_s": self.samples_per_s, "write_share": self.write_share}
        return {
            k: str(v) if k == "out" else None if isinstance(v, float) and math.isnan(v) else v for k, v in d.items()
        }


def sample_dataset(
    model: Denoiser,
    ts: torch.Tensor,
    solver: Any,
    out: str | Path,
    *,
    num: int | None = None,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    input: str | Path | None = None,
    shard_size: int | None = None,
    conditions: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    description: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Summary:
    """Sample a data set into the folder ``out``, one shard file per ``shard_size`` consecutive samples.

    Fresh samples: ``num`` samples of latent ``shape``, sample ``i`` from ``noise(seed, i)`` scaled to the marginal
    standard deviation ``sqrt(alpha^2 + sigma^2)`` at ``ts[0]`` (1 for variance-preserving schedules and flows),
    in ``dtype`` (float32 by default). From states: ``input`` is a run folder (an ``invert_dataset`` result, whose
    pairs are continued, or an earlier sampling's end); its shards and their conditioning are taken as they are.

    ``conditions``: model keywords with one row per sample (e.g. ``labels``, shape ``(num,)``), sliced per shard;
    they replace the input's of the same name. ``model`` must live on ``device`` (default: ``default_device()``).
    ``description``: JSON-able facts about the run that its objects' reprs do not show (e.g. a guidance scale),
    stored and checked with the manifest. Call it in every rank of a ``torchrun`` launch; returns the same
    ``Summary`` on every rank.
    """
    if input is not None:
        if num is not None or shape is not None:
            raise ValueError("num and shape come from the input folder: pass input or num and shape, not both")
        source: _Noise | _Shards | _Images = _input(input, dtype)
        if isinstance(source, _Images):
            raise DatasetError(f"input {input}: sampling starts from a run folder (with {MANIFEST}), not from images")
    else:
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be an int >= 1 (the number of samples), got {num!r}")
        if shape is None or not all(isinstance(s, int) and s >= 1 for s in shape) or len(shape) == 0:
            raise ValueError(f"shape must be one sample's latent shape, a sequence of ints >= 1, got {shape!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        grid = check_grid(ts, getattr(model, "schedule", None))
        k = model.schedule.at(grid[0])
        source = _Noise(num, shape, seed, math.sqrt(k.alpha**2 + k.sigma**2), dtype or torch.float32)
    return _run(sample, model, ts, solver, source, out, shard_size, conditions, device, description, progress)


def invert_dataset(
    model: Denoiser,
    ts: torch.Tensor,
    solver: Any,
    out: str | Path,
    *,
    input: str | Path,
    shard_size: int | None = None,
    conditions: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    description: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Summary:
    """Invert a data set into the folder ``out``: each shard holds the inverted pair (``x`` the latent at
    ``ts[0]``, ``x_prev`` at ``ts[1]``) that ``sample_dataset(input=out)`` continues.

    ``input``: a run folder of ``sample_dataset`` (its exact pairs are inverted: exact to rounding for an exact
    solver over the same grid; shards and conditioning as they are) or a folder of PNG images (``read_png``, in
    sorted name order, in ``dtype``; the first step from the data is one plain integrator step, the only
    approximation of an exact solver, which sampling undoes). Other arguments as ``sample_dataset``.
    """
    return _run(
        invert, model, ts, solver, _input(input, dtype), out, shard_size, conditions, device, description, progress
    )


def _name(obj: Any) -> str:
    # default reprs carry a memory address, which differs from process to process
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj))


def _digest(t: torch.Tensor) -> dict[str, Any]:
    data = t.detach().cpu().contiguous()
    return {
        "dtype": str(data.dtype).removeprefix("torch."),
        "shape": list(data.shape),
        "sha256": hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest() if data.numel() else "",
    }


def _normalised(manifest: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(manifest))  # tuples become lists, as they are read back


def _check_manifest(out: Path, expected: dict[str, Any]) -> None:
    stored = _read_manifest(out)
    keys = [k for k in {**stored, **expected} if k not in ("info", "run") and stored.get(k) != expected.get(k)]
    if keys:

        def short(v: Any) -> str:
            text = json.dumps(v)
            return text if len(text) < 200 else text[:200] + " ..."

        lines = "\n".join(f"  {k}: stored {short(stored.get(k))}, this run {short(expected.get(k))}" for k in keys)
        raise DatasetError(
            f"{out / MANIFEST} describes a different run, so its shards cannot be continued by this one:\n{lines}\n"
            "Write to a new folder, or repeat the original settings to resume it."
        )


def _lock(folder: Path) -> Any:
    """Hold ``folder/LOCK`` exclusively (``flock``) until the returned file is closed. The kernel drops the lock
    when the process ends, however it ends, so a killed run leaves no stale lock behind."""
    f = open(folder / LOCK, "ab")  # held open for the whole run
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if isinstance(e, BlockingIOError | PermissionError):
            raise DatasetError(
                f"{folder} is in use by another run (it holds {folder / LOCK}): wait for that run to end, or write to "
                "another folder"
            ) from e
        raise DatasetError(f"cannot lock {folder / LOCK} ({e}): a run folder needs a file system with locks") from e
    return f


def _prepare(out: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, holding the lock: clear what killed writers left and write the manifest of a folder that holds no
    shard yet (a new folder, or a first try that failed before its first shard)."""
    for p in out.glob(".shard-*.tmp"):  # left by a killed run; no rank writes before the verdict below
        p.unlink(missing_ok=True)
    has_shards = bool(_shard_files(out))
    if (out / MANIFEST).exists():
        _read_manifest(out)  # a bdia manifest (of any run), or an error: never overwrite another file
        if has_shards:
            return  # every rank compares it with this run's next
    elif has_shards:
        raise DatasetError(f"{out} holds shard files but no {MANIFEST}: it cannot be continued (write elsewhere)")
    _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _run(
    walk: Callable[..., State],
    model: Denoiser,
    ts: torch.Tensor,
    solver: Any,
    source: _Noise | _Shards | _Images,
    out: str | Path,
    shard_size: int | None,
    conditions: Mapping[str, torch.Tensor] | None,
    device: torch.device | str | None,
    description: Mapping[str, Any] | None,
    progress: bool,
) -> Summary:
    _safetensors()  # before any work, not after the first shard
    grid = check_grid(ts, getattr(model, "schedule", None))
    device = default_device() if device is None else torch.device(device)
    if source.shard_size is not None:  # the input's batches are kept: the same network batches, the same bits
        if shard_size is not None and shard_size != source.shard_size:
            raise ValueError(
                f"shard_size={shard_size} differs from the input's {source.shard_size}: a run from a run folder "
                "keeps its shards (leave shard_size unset)"
            )
        shard_size = source.shard_size
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1 (samples per shard and per batch), got {shard_size!r}")
    conditions = dict(conditions or {})
    for name, c in conditions.items():
        if not isinstance(c, torch.Tensor) or c.dim() < 1 or c.shape[0] not in (1, source.num):
            got = tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__
            raise ValueError(
                f"conditions[{name!r}] must be a tensor with one row per sample ({source.num}) or one row for all, "
                f"got {got}"
            )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; expected a run folder (a new one, or one to resume)")
    ranges = _ranges(source.num, shard_size)
    definition = {
        "format": FORMAT,
        "task": walk.__name__,
        "num": source.num,
        "shard_size": shard_size,
        "shards": len(ranges),
        "source": source.describe(),
        "grid": grid,
        "schedule": _name(model.schedule),
        "model": _name(model),
        "solver": _name(solver),
        "dtype": str(source.dtype).removeprefix("torch."),
        "conditions": {k: _digest(v) for k, v in sorted(conditions.items())},
        "description": dict(description or {}),
        "environment": {
            "bdia": _version(),
            "torch": torch.__version__,
            "device": device.type,
            # CPU kernels split work by thread count, and the split changes the rounding of a batch
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
    }
    definition = _normalised(definition)
    run = _run_id(definition)
    manifest = {
        "format": FORMAT,
        "run": run,
        **definition,
        "info": {"input": str(getattr(source, "folder", "")) or None},  # not part of the run's identity
    }
    group = _Group(device)
    lock = None
    try:
        # rank 0 takes the folder (lock, manifest); every rank learns whether it could (one all-reduce, no pickles)
        failure: BaseException | None = None
        if group.rank == 0:
            try:
                out.mkdir(parents=True, exist_ok=True)
                lock = _lock(out)
                _prepare(out, manifest)
            except Exception as e:
                failure = e
        if group.sum([0.0 if failure is None else 1.0])[0]:
            if failure is not None:
                raise failure
            raise DatasetError(f"rank 0 could not start the run in {out} (its error says why)")
        _check_manifest(out, manifest)
        done, stale = _verify(out, ranges, manifest, group)  # every rank has listed: only now may shards be written
        todo = [k for k in range(len(ranges)) if k not in done]
        mine = todo[group.rank :: group.world]
        total = sum(ranges[k][1] - ranges[k][0] for k in todo)

        def finished() -> set[int]:  # written since the start, as the files on disk show it (all ranks' work)
            now = _shard_files(out) - done
            return {k for k in now if k < len(ranges) and _inode(out / shard_name(k)) != stale.get(k)}

        start = time.perf_counter()
        busy = written = cpu = 0.0
        with (
            tqdm(
                total=total,
                disable=not progress or group.rank != 0,
                unit="sample",
                desc=f"{walk.__name__} x{group.world}",
                dynamic_ncols=True,
            ) as bar,
            torch.no_grad(),
        ):
            for k in mine:
                t0, c0 = time.perf_counter(), time.process_time()
                lo, hi = ranges[k]
                x, conds, extra = source.read(k, lo, hi)
                kw = {**conds, **{name: _rows(c, lo, hi) for name, c in conditions.items()}}
                x = x.to(device)
                try:  # (what the walk refuses, told apart from what fails once the network runs)
                    check(model, x, ts, solver, forward=walk is sample)
                except (ValueError, TypeError, FloatingPointError) as e:
                    raise Refused(f"shard {k} (samples {lo}..{hi - 1}): {e}") from e
                state = walk(model, x, ts, solver, **{n: v.to(device) for n, v in kw.items()})
                t1 = time.perf_counter()
                _atomic_write(out / shard_name(k), _shard_bytes(run, k, lo, hi, state, kw, extra))
                t2 = time.perf_counter()
                busy, written, cpu = busy + t2 - t0, written + t2 - t1, cpu + time.process_time() - c0
                if not bar.disable:
                    bar.update(sum(ranges[j][1] - ranges[j][0] for j in finished()) - bar.n)
            group.barrier()
            seconds = time.perf_counter() - start
            bar.update(total - bar.n)
        computed, busy_s, write_s, cpu_s = group.sum([float(len(mine)), busy, written, cpu])
        message = _missing_message(out, len(ranges), _shard_files(out))
        if message:
            raise DatasetError(message)
    finally:
        if lock is not None:
            lock.close()
        group.close()
    return Summary(out, len(ranges), round(computed), len(done), total, group.world, seconds, busy_s, write_s, cpu_s)


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


_GOOD, _DAMAGED, _FOREIGN = 1.0, 2.0, 3.0


def _verify(
    out: Path, ranges: list[tuple[int, int]], manifest: dict[str, Any], group: _Group
) -> tuple[set[int], dict[int, int | None]]:
    """The shards already done: rank ``r`` checks the shard files ``k = r mod world`` (checksum, place, run id)
    and one all-reduce tells every rank the verdicts. A damaged shard (truncated, altered, misplaced) is computed
    again (its inode is returned, to tell its replacement apart); a whole shard of another run is an error."""
    verdict = [0.0] * len(ranges)
    for k in sorted(_shard_files(out)):
        if k < len(ranges) and k % group.world == group.rank:
            try:
                _load_checked(out, k, *ranges[k], manifest)
                verdict[k] = _GOOD
            except _ForeignShard:
                verdict[k] = _FOREIGN
            except DatasetError as e:
                warnings.warn(f"{e}; computing it again", stacklevel=3)
                verdict[k] = _DAMAGED
    verdict = group.sum(verdict)
    foreign = [k for k, v in enumerate(verdict) if v == _FOREIGN]
    if foreign:
        raise DatasetError(
            f"{out / shard_name(foreign[0])} and {len(foreign) - 1} other shard(s) belong to another run than "
            f"{out / MANIFEST} describes: move them away to compute them again"
        )
    done = {k for k, v in enumerate(verdict) if v == _GOOD}
    return done, {k: _inode(out / shard_name(k)) for k, v in enumerate(verdict) if v == _DAMAGED}


def _rows(c: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return c.expand(hi - lo, *c.shape[1:]).contiguous() if c.shape[0] == 1 else c[lo:hi]


def _version() -> str:
    import bdia

    return bdia.__version__
