"""Data-parallel sampling and inversion: a data set of samples, or of exact latents, written as shards on disk.

A run is a fixed list of *shards*: consecutive sample indices, ``shard_size`` of them (the last may be shorter).
Each shard is one batch through ``bdia.sample`` or ``bdia.invert`` (BDIA, Zhang, Lewis & Kleijn, ECCV 2024, or
any solver of ``bdia.solvers``), written atomically (a hidden temporary file, then a rename) as a safetensors file
holding the walk's final pair ``x``, ``x_prev``, the sample indices and the conditioning. Sample ``i`` starts from
noise drawn by its own generator, seeded by ``(seed, i)`` (``noise``), so which process ran a shard, how many
processes there were and whether the run was interrupted cannot change a bit.

Processes are ``torch.distributed`` ranks (one per GPU, launched by ``torchrun``; gloo on CPU, nccl on CUDA). Rank
``r`` of ``W`` takes the missing shards ``r, r + W, ...``. Without a process group (or with one process) everything
runs in-process. Rank 0 writes ``manifest.json`` (the run's definition: source, grid, model, solver, dtype,
conditioning, versions) before any shard, and every rank checks it: a restarted run skips the shards already there
and refuses to continue a run that was defined differently. See docs/scale.md.

Inputs are a folder of shards (a sampled set is inverted from its exact pairs; an inverted set is sampled from its
pairs, e.g. under a new class) or a folder of PNG images (decoded here, with the standard library and numpy).
Nothing is unpickled: shards are safetensors, the manifest is JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bdia.models import Denoiser
from bdia.sampling import invert, sample
from bdia.schedules import check_grid
from bdia.state import State

__all__ = [
    "FORMAT",
    "Dataset",
    "DatasetError",
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

FORMAT = "bdia.batch/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"shard-(\d+)\.safetensors")
_COND = "cond."  # prefix of conditioning tensors in a shard file


class DatasetError(ValueError):
    """A run folder or input that cannot be used as asked: a manifest of another run, missing shards, bad files."""


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
    run) sees the whole file or none of it, even if this process is killed half-way."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _existing(folder: Path, count: int) -> set[int]:
    with os.scandir(folder) as it:
        found = {int(m.group(1)) for e in it if (m := _SHARD.fullmatch(e.name))}
    return {k for k in found if k < count and (folder / shard_name(k)).is_file()}


@dataclasses.dataclass(frozen=True)
class Shard:
    """One shard file: the walk's final ``state`` for samples ``index``, their ``conditions`` (model keywords,
    one row per sample) and its metadata ``meta`` (shard number, index range, PNG file names for images)."""

    state: State
    index: torch.Tensor
    conditions: dict[str, torch.Tensor]
    meta: dict[str, Any]


def load_shard(path: str | Path, device: torch.device | str = "cpu") -> Shard:
    """Read one shard file written by ``sample_dataset`` / ``invert_dataset`` (safetensors: nothing is unpickled)."""
    path = Path(path)
    with _safetensors().safe_open(str(path), framework="pt", device=str(device)) as f:
        raw = (f.metadata() or {}).get("bdia.shard")
        if raw is None:
            raise DatasetError(f"{path} is not a bdia shard (no 'bdia.shard' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw)
    for key in ("x", "x_prev", "index"):
        if key not in tensors:
            raise DatasetError(f"{path} lacks the tensor {key!r}")
    state = State(tensors["x_prev"], tensors["x"], float(meta["t_prev"]), float(meta["t"]), bool(meta["coupled"]))
    conds = {k[len(_COND) :]: v for k, v in tensors.items() if k.startswith(_COND)}
    return Shard(state, tensors["index"], conds, meta)


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
    """The ``manifest.json`` of a run folder: what the run was (task, grid, model, solver, ...), as a dict."""
    return _read_manifest(Path(folder))[0]


def _read_manifest(folder: Path) -> tuple[dict[str, Any], bytes]:
    path = folder / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{folder} is not a bdia run folder (no {MANIFEST})")
    raw = path.read_bytes()
    manifest = json.loads(raw)
    if manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest, raw


def _missing_message(folder: Path, missing: list[int]) -> str:
    shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
    return f"{folder} is incomplete: {len(missing)} shard(s) missing ({shown}); rerun the command that made it"


def load_dataset(folder: str | Path, device: torch.device | str = "cpu") -> Dataset:
    """Read every shard of a finished run, checking that each sample index appears exactly once."""
    folder = Path(folder)
    manifest, _ = _read_manifest(folder)
    count = manifest["shards"]
    missing = sorted(set(range(count)) - _existing(folder, count))
    if missing:
        raise DatasetError(_missing_message(folder, missing))
    shards = [load_shard(folder / shard_name(k), device) for k in range(count)]
    index = torch.cat([s.index for s in shards])
    if not torch.equal(index.cpu(), torch.arange(manifest["num"])):
        raise DatasetError(f"{folder}: the shards' sample indices are not 0..{manifest['num'] - 1} in order, once each")
    first = shards[0].state
    times = {(s.state.t_prev, s.state.t, s.state.coupled) for s in shards}
    if len(times) != 1:
        raise DatasetError(f"{folder}: shards end at different times {sorted(times)}")
    state = State(
        torch.cat([s.state.x_prev for s in shards]),
        torch.cat([s.state.x for s in shards]),
        first.t_prev,
        first.t,
        first.coupled,
    )
    conds = {k: torch.cat([s.conditions[k] for s in shards]) for k in shards[0].conditions}
    names = [n for s in shards for n in s.meta["names"]] if "names" in shards[0].meta else None
    return Dataset(state, index, conds, names, manifest)


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
    """The shards of an earlier run: its output shard ``k`` is this run's input shard ``k`` (same batches)."""

    def __init__(self, folder: Path, dtype: torch.dtype | None):
        self.folder = folder
        self.manifest, raw = _read_manifest(folder)
        self.num, self.shard_size = self.manifest["num"], self.manifest["shard_size"]
        missing = sorted(set(range(self.manifest["shards"])) - _existing(folder, self.manifest["shards"]))
        if missing:
            raise DatasetError(_missing_message(folder, missing))
        self.digest = hashlib.sha256(raw).hexdigest()
        stored = getattr(torch, self.manifest["dtype"])
        if dtype is not None and dtype != stored:
            raise DatasetError(f"{folder} holds {stored} latents but dtype={dtype} was asked for; convert them first")
        self.dtype = stored

    def describe(self) -> dict[str, Any]:
        return {"kind": "shards", "task": self.manifest["task"], "manifest_sha256": self.digest}

    def read(self, k: int, lo: int, hi: int) -> tuple[State, dict[str, torch.Tensor], dict[str, Any]]:
        shard = load_shard(self.folder / shard_name(k))
        if shard.meta["start"] != lo or shard.meta["stop"] != hi:
            raise DatasetError(f"{self.folder / shard_name(k)} covers [{shard.meta['start']}, {shard.meta['stop']})")
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
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return {**d, "samples_per_s": self.samples_per_s, "write_share": self.write_share}


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
    stored, _ = _read_manifest(out)
    keys = [k for k in {**stored, **expected} if k != "info" and stored.get(k) != expected.get(k)]
    if keys:

        def short(v: Any) -> str:
            text = json.dumps(v)
            return text if len(text) < 200 else text[:200] + " ..."

        lines = "\n".join(f"  {k}: stored {short(stored.get(k))}, this run {short(expected.get(k))}" for k in keys)
        raise DatasetError(
            f"{out / MANIFEST} describes a different run, so its shards cannot be continued by this one:\n{lines}\n"
            "Write to a new folder, or repeat the original settings to resume it."
        )


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
    ranges = [(lo, min(lo + shard_size, source.num)) for lo in range(0, source.num, shard_size)]
    out = Path(out)
    manifest = _normalised(
        {
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
            "info": {"input": str(getattr(source, "folder", "")) or None},  # not compared on resume
        }
    )
    group = _Group(device)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if group.rank == 0:
            for p in out.glob(".shard-*.tmp"):  # left by a killed run; no rank writes before the barrier below
                p.unlink(missing_ok=True)
            # a folder without shards holds nothing to mix up: (re)define it, e.g. after a first try that failed
            if not (out / MANIFEST).exists() or not _existing(out, 2**62):
                _atomic_write(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        done = _existing(out, len(ranges))  # listed before the barrier: no shard is written until all have passed
        group.barrier()
        _check_manifest(out, manifest)
        todo = [k for k in range(len(ranges)) if k not in done]
        mine = todo[group.rank :: group.world]
        total = sum(hi - lo for k, (lo, hi) in enumerate(ranges) if k not in done)
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
                state = walk(model, x.to(device), ts, solver, **{n: v.to(device) for n, v in kw.items()})
                t1 = time.perf_counter()
                _write_shard(out / shard_name(k), k, lo, hi, state, kw, extra)
                t2 = time.perf_counter()
                busy, written, cpu = busy + t2 - t0, written + t2 - t1, cpu + time.process_time() - c0
                if not bar.disable:  # all ranks' progress, as the files on disk show it
                    now = _existing(out, len(ranges)) - done
                    bar.update(sum(ranges[j][1] - ranges[j][0] for j in now) - bar.n)
            group.barrier()
            seconds = time.perf_counter() - start
            bar.update(total - bar.n)
        computed, busy_s, write_s, cpu_s = group.sum([float(len(mine)), busy, written, cpu])
        missing = sorted(set(range(len(ranges))) - _existing(out, len(ranges)))
        if missing:
            raise DatasetError(_missing_message(out, missing))
    finally:
        group.close()
    return Summary(out, len(ranges), round(computed), len(done), total, group.world, seconds, busy_s, write_s, cpu_s)


def _rows(c: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return c.expand(hi - lo, *c.shape[1:]).contiguous() if c.shape[0] == 1 else c[lo:hi]


def _write_shard(
    path: Path, k: int, lo: int, hi: int, state: State, conds: dict[str, torch.Tensor], extra: dict[str, Any]
) -> None:
    tensors = {
        "x": state.x.detach().cpu().contiguous(),
        "x_prev": state.x_prev.detach().cpu().contiguous(),
        "index": torch.arange(lo, hi, dtype=torch.int64),
        **{_COND + n: v.detach().cpu().contiguous() for n, v in conds.items()},
    }
    # nothing about the process goes in: the same shard has the same bytes whichever rank wrote it
    meta = {"shard": k, "start": lo, "stop": hi, "t_prev": state.t_prev, "t": state.t, "coupled": state.coupled}
    _atomic_write(path, _safetensors().torch.save(tensors, metadata={"bdia.shard": json.dumps({**meta, **extra})}))


def _version() -> str:
    import bdia

    return bdia.__version__
