"""Command line: ``bdia {sample,invert,demo} [options]``, also ``python -m bdia`` and ``torchrun -m bdia``.

``sample`` draws a data set into shard files (or resamples the pairs of an inverted one, ``--input``); ``invert``
turns a folder of PNG images or of shards into exact latents (pair states that ``sample --input`` continues);
``demo`` is the editing demo on the shipped digits model. ``sample`` and ``invert`` are argument parsing around
``bdia.batch.sample_dataset`` / ``invert_dataset``; under ``torchrun`` every process runs the same command and
takes its share of the shards (docs/scale.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bdia
import bdia.batch

__all__ = ["MODELS", "SOLVERS", "main"]

DEFAULT_STEPS = 50
DEFAULT_SPACING = "trailing"  # the spacing the digits model is evaluated with (docs/digits.md)


# ------------------------------------------------------------------------------------------------ names -> objects


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """A ``--model`` value: ``build(device, dtype, guidance)`` makes the denoiser; ``shape`` is one sample's
    latent shape (None: ``--shape`` gives it); ``classes`` the valid ``--class`` values (None: unchecked);
    ``labels(num)`` the labels fresh samples get without ``--class`` (None: no labels)."""

    build: Callable[[torch.device, torch.dtype, float | None], Any]
    shape: tuple[int, ...] | None = None
    classes: range | None = None
    labels: Callable[[int], torch.Tensor] | None = None


def _digits(device: torch.device, dtype: torch.dtype, guidance: float | None) -> Any:
    from bdia import digits

    return digits.model(guidance, dtype=dtype, device=device)


def _gmm(device: torch.device, dtype: torch.dtype, guidance: float | None) -> Any:
    from bdia.models import GaussianMixture
    from bdia.schedules import DiscreteVP

    if guidance is not None:
        raise _Usage("--guidance does not apply to --model gmm (an exact denoiser, no unconditional network)")
    sd = DiscreteVP.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    return GaussianMixture.random(sd, dim=64, components=8, std=0.2, seed=0)  # the demo's mixture


MODELS: dict[str, ModelChoice] = {
    # the shipped class-conditional 8x8 digits model; fresh samples cycle through the classes 0..9
    "digits": ModelChoice(_digits, (1, 8, 8), range(11), lambda n: torch.arange(n) % 10),
    # an analytic 64-d Gaussian mixture of 8 components under Stable Diffusion's schedule; class = component
    "gmm": ModelChoice(_gmm, (64,), range(-1, 8)),
}

SPACINGS = ("leading", "trailing", "linspace")

# --solver name -> (the option of its parameter, build(value or None: the default)); the parameter's option is
# refused for the other solvers
SOLVERS: dict[str, tuple[str | None, Callable[[float | None], Any]]] = {
    "bdia": ("--gamma", lambda g: bdia.solvers.BDIA(bdia.solvers.DDIM(), gamma=1.0 if g is None else g)),
    "ddim": (None, lambda _: bdia.solvers.DDIM()),
    "edict": ("--p", lambda p: bdia.solvers.EDICT(bdia.solvers.DDIM(), p=0.93 if p is None else p)),
    "obelm": (None, lambda _: bdia.solvers.OBELM()),
}


class _Usage(Exception):
    """A command-line argument that cannot be used; reported through the parser (exit status 2)."""


def _user_model(spec: str) -> ModelChoice:
    """The factory a ``--model module:attribute`` names: imported because the user named it on the command line
    (never because a run folder's manifest does)."""
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise _Usage(f"--model must be one of {sorted(MODELS)} or module:attribute (a denoiser factory), got {spec!r}")
    try:
        factory = functools.reduce(getattr, attr.split("."), _import(module))
    except Exception as e:  # the user's module: any error in it (ImportError, SyntaxError, ...) is theirs to see
        raise _Usage(f"--model {spec}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(factory):
        raise _Usage(f"--model {spec} is not callable: expected factory(device=..., dtype=..., [guidance=...])")

    def build(device: torch.device, dtype: torch.dtype, guidance: float | None) -> Any:
        return factory(device=device, dtype=dtype, **({} if guidance is None else {"guidance": guidance}))

    return ModelChoice(build)


def _import(module: str) -> Any:
    """Import ``module`` looking in the current folder first, as ``python -m bdia`` would and as users expect of
    the ``bdia`` command too (whose own ``sys.path[0]`` is its script's folder); the folder is on the path for this
    import only, so nothing else bdia imports later can be taken from it."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written since the folder was last listed
    try:
        return importlib.import_module(module)
    finally:
        if added:
            sys.path.remove(cwd)


# ------------------------------------------------------------------------------------------------ the parser


def _int_at_least(lowest: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``lowest``, else a usage error naming what was given."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = lowest - 1
        if v < lowest:
            raise argparse.ArgumentTypeError(f"expected an int >= {lowest}, got {text!r}")
        return v

    return parse


_positive, _nonnegative = _int_at_least(1), _int_at_least(0)


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected sizes separated by commas, e.g. 4,64,64; got {text!r}")
    return shape


def _common(p: argparse.ArgumentParser, task: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="digits, gmm, or module:attribute naming factory(device=, dtype=, [guidance=]) -> denoiser "
        "(default: the input run's, else digits)",
    )
    g.add_argument("--guidance", type=_finite, help="classifier-free guidance scale (default: the input run's; none)")
    g.add_argument(
        "--class",
        dest="cls",
        type=int,
        metavar="C",
        help="condition every sample on class C (model keyword labels=; digits: 0-9, 10 unconditional); default: "
        "the input's labels" + (", else digits cycle 0..9" if task == "sample" else ""),
    )
    g.add_argument("--dtype", choices=["float32", "float64"], help="latent and network dtype (default: the input's)")
    g = p.add_argument_group("grid and solver (default: what the input run used, every setting of it)")
    g.add_argument("--steps", type=_positive, help=f"grid steps (else {DEFAULT_STEPS})")
    g.add_argument("--spacing", choices=SPACINGS, help=f"else {DEFAULT_SPACING}")
    g.add_argument("--solver", choices=sorted(SOLVERS), help="else bdia")
    g.add_argument(
        "--gamma", type=_finite, help="BDIA's gamma in [0, 1] (the input run's for the same solver, else 1: exact)"
    )
    g.add_argument("--p", type=_finite, help="EDICT's mixing weight in (0, 1] (the input run's, else 0.93)")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="the run folder (shards and manifest.json)")
    g.add_argument(
        "--batch-size",
        type=_positive,
        help="samples per shard, each shard one network batch (default 100; an input run's own)",
    )
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is there, else cpu), cpu, cuda")
    g.add_argument(
        "--threads",
        type=_positive,
        help="CPU threads per process (default 1: CPU results depend on the thread count, and one thread per "
        "process gives the same bits at any process count)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="torch.use_deterministic_algorithms(True) (for bit-reproducible CUDA runs)",
    )
    g.add_argument("--stats", type=Path, help="write this run's figures (samples/s, shard-writing share) as JSON")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on rank 0")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bdia",
        description="Exactly invertible diffusion sampling (BDIA) at scale: sample, invert, demo.",
        epilog="Many processes: torchrun --nproc-per-node N -m bdia sample ... (docs/scale.md).",
    )
    p.add_argument("--version", action="version", version=f"bdia {bdia.__version__}")
    sub = p.add_subparsers(dest="command", metavar="command")
    s = sub.add_parser(
        "sample",
        help="draw samples into shard files, or resample an inverted run (--input)",
        description="Draw --num samples (sample i from noise seeded by (--seed, i)) or continue the pairs of an "
        "inverted run (--input), writing shards of --batch-size samples to --out.",
    )
    g = s.add_argument_group("samples")
    g.add_argument(
        "--num",
        "-n",
        "--num-samples",
        dest="num",
        type=_positive,
        help="how many samples (fresh sampling); under torchrun write -n or --num-samples: torchrun takes --num "
        "for an abbreviation of its own --numa-binding",
    )
    g.add_argument("--seed", type=_nonnegative, default=0, help="noise seed, an int >= 0 (default 0)")
    g.add_argument("--shape", type=_shape, help="one sample's latent shape for a module:attribute model, e.g. 4,64,64")
    g.add_argument("--input", type=Path, help="a run folder of `bdia invert` whose pairs are continued")
    _common(s, "sample")
    s.set_defaults(run=_sample)
    i = sub.add_parser(
        "invert",
        help="invert PNG images or a sampled run into exact latents (pair states)",
        description="Invert a folder of PNG images (sorted by name; pixels mapped to [-1, 1]) or a run folder of "
        "`bdia sample` into pair states at the grid's first time, which `bdia sample --input` continues.",
    )
    i.add_argument("--input", type=Path, required=True, help="a folder of PNG images or a run folder")
    _common(i, "invert")
    i.set_defaults(run=_invert)
    sub.add_parser("demo", help="the editing demo on the shipped digits model (bdia demo --help)", add_help=False)
    return p


# ------------------------------------------------------------------------------------------------ the commands


@dataclasses.dataclass
class _Setup:
    model: Any
    ts: torch.Tensor
    solver: Any
    dtype: torch.dtype
    device: torch.device
    conditions: dict[str, torch.Tensor]
    description: dict[str, Any]
    choice: ModelChoice


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# what a manifest's description may hold (it is data from disk: each value is checked before it is used)
_DESCRIPTION: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "model": ("a model name", lambda v: isinstance(v, str)),
    "guidance": ("a finite number", _number),
    "solver": (f"one of {sorted(SOLVERS)}", lambda v: v in SOLVERS),
    "gamma": ("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1),
    "p": ("a number in (0, 1]", lambda v: _number(v) and 0 < v <= 1),
    "steps": ("an int >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "spacing": (f"one of {list(SPACINGS)}", lambda v: v in SPACINGS),
}


def _described(stored: dict[str, Any] | None, folder: Path | None) -> dict[str, Any]:
    """The settings an input run was made with (its manifest's description), each checked; None: not recorded."""
    if stored is None:
        return dict.fromkeys(_DESCRIPTION)
    before = stored["description"]
    for key, (expected, ok) in _DESCRIPTION.items():
        if before.get(key) is not None and not ok(before[key]):
            raise bdia.batch.DatasetError(
                f"{folder / bdia.batch.MANIFEST}: description.{key} is {before[key]!r}, expected {expected}"
            )
    return {k: before.get(k) for k in _DESCRIPTION}


def _setup(a: argparse.Namespace, stored: dict[str, Any] | None) -> _Setup:
    """Arguments, completed from the input run's manifest (``stored``), to the objects of a run: whatever the
    command line does not set is what the input run used (its model name, guidance, dtype, grid, solver and
    the solver's parameter), never a default."""
    before = _described(stored, a.input)
    spec = a.model
    if spec is None and stored is not None:
        spec = before["model"]
        if spec is None:
            raise _Usage(f"--model is needed: {a.input / bdia.batch.MANIFEST} does not name the run's model")
        if spec not in MODELS:
            # a run folder is data: what its manifest names is never imported (it may come from anywhere)
            raise _Usage(
                f"--model is needed: the input run was made with --model {spec}, and a module:attribute written in a "
                f"run folder is not imported; pass --model {spec} to import it yourself"
            )
    spec = spec or "digits"
    guidance = a.guidance if a.guidance is not None else before["guidance"]
    solver_name = a.solver or before["solver"] or "bdia"
    option, make = SOLVERS[solver_name]
    given = {"--gamma": a.gamma, "--p": a.p}
    for name, value in given.items():
        if value is not None and name != option:
            raise _Usage(
                f"{name} applies to --solver {'bdia' if name == '--gamma' else 'edict'} only, not {solver_name}"
            )
    parameter = given.get(option) if option else None
    if option and parameter is None and solver_name == before["solver"]:  # the same solver: its parameter too
        parameter = before[option.removeprefix("--")]
    choice = MODELS.get(spec) or _user_model(spec)
    dtype = getattr(torch, a.dtype or (stored or {}).get("dtype") or "float32")
    device = a.device
    try:
        model = choice.build(device, dtype, guidance)
    except _Usage:
        raise
    except Exception as e:  # the factory's own failure, reported as what it is, without a traceback
        raise _Usage(f"--model {spec}: building the model failed ({type(e).__name__}: {e})") from e
    if not callable(model) or not isinstance(getattr(model, "schedule", None), bdia.schedules.Schedule):
        raise _Usage(f"--model {spec} gave {type(model).__name__}, not a denoiser (callable, with a .schedule)")
    steps, spacing = a.steps or before["steps"], a.spacing or before["spacing"]
    if stored is not None and a.steps is None and a.spacing is None:
        ts = torch.tensor(stored["grid"], dtype=torch.float64)  # the input's grid, to the bit
    else:
        steps = steps or DEFAULT_STEPS
        ts, spacing = _grid(model.schedule, steps, spacing, explicit=a.spacing is not None)
    try:
        solver = make(parameter)
    except (TypeError, ValueError) as e:
        raise _Usage(f"{option} {parameter:g}: {e}") from e
    conditions = {}
    if a.cls is not None:
        if choice.classes is not None and a.cls not in choice.classes:
            raise _Usage(f"--class must lie in {choice.classes.start}..{choice.classes.stop - 1} for --model {spec}")
        conditions["labels"] = torch.tensor([a.cls], dtype=torch.int64)
    description = {
        "model": spec,
        "guidance": guidance,
        "solver": solver_name,
        "gamma": solver.gamma.constant if solver_name == "bdia" else None,
        "p": getattr(solver, "p", None),
        "steps": steps,
        "spacing": spacing,
    }
    return _Setup(model, ts, solver, dtype, device, conditions, description, choice)


def _device(text: str) -> torch.device:
    """``--device``: auto, cpu, cuda (this process's GPU: cuda:LOCAL_RANK), cuda:N, or mps where it is there."""
    try:
        device = bdia.batch.default_device() if text == "auto" else torch.device(text)
    except (RuntimeError, ValueError) as e:
        raise _Usage(f"--device {text}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Usage(f"--device {text}: this torch sees no CUDA device (use cpu or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise _Usage(f"--device {text}: this torch sees no MPS device (use cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise _Usage(f"--device {text}: expected auto, cpu, cuda, cuda:N or mps (a device that holds data)")
    return bdia.batch.default_device() if device.type == "cuda" and device.index is None else device


def _grid(schedule: Any, steps: int, spacing: str | None, explicit: bool) -> tuple[torch.Tensor, str | None]:
    """The grid of ``--steps`` and ``--spacing`` (an inherited spacing is dropped for a schedule without one)."""
    if "spacing" not in inspect.signature(schedule.timesteps).parameters:
        if explicit:
            raise _Usage(f"--spacing does not apply to {schedule!r}, whose timesteps(n) has no spacing")
        spacing, kw = None, {}
    else:
        spacing = spacing or DEFAULT_SPACING
        kw = {"spacing": spacing}
    try:
        return schedule.timesteps(steps, **kw), spacing
    except (TypeError, ValueError) as e:
        raise _Usage(f"--steps {steps}: {e}") from e


def _writable(path: Path, option: str) -> None:
    """``path`` can be written as a file (checked before the run, not after it)."""
    folder = path.parent
    if path.is_dir():
        raise _Usage(f"{option} {path} is a folder; expected a file to write")
    if not folder.is_dir():
        raise _Usage(f"{option} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise _Usage(f"{option} {path} cannot be written (permission denied)")


def _sample(a: argparse.Namespace) -> bdia.batch.Summary:
    stored = bdia.batch.read_manifest(a.input) if a.input is not None else None
    if a.input is not None and (a.num is not None or a.shape is not None):
        raise _Usage("--num and --shape come from --input; give one or the other")
    if a.input is None and a.num is None:
        raise _Usage("give --num (fresh samples) or --input (a run folder of `bdia invert`)")
    run = _setup(a, stored)
    extra: dict[str, Any] = {}
    if a.input is None:
        if run.choice.shape is not None and a.shape is not None:
            raise _Usage("--shape is for module:attribute models; the built-in ones know their shape")
        shape = a.shape or run.choice.shape
        if shape is None:
            raise _Usage("--shape is needed for a module:attribute model (one sample's latent shape, e.g. 4,64,64)")
        if "labels" not in run.conditions and run.choice.labels is not None:
            run.conditions["labels"] = run.choice.labels(a.num)
        extra = {"num": a.num, "shape": shape, "seed": a.seed}
    else:
        extra = {"input": a.input}
    return bdia.batch.sample_dataset(
        run.model,
        run.ts,
        run.solver,
        a.out,
        shard_size=a.batch_size or (None if a.input is not None else 100),
        conditions=run.conditions,
        dtype=run.dtype,
        device=run.device,
        description=run.description,
        progress=a.progress,
        **extra,
    )


def _invert(a: argparse.Namespace) -> bdia.batch.Summary:
    stored = bdia.batch.read_manifest(a.input) if (a.input / bdia.batch.MANIFEST).exists() else None
    run = _setup(a, stored)
    if run.description["guidance"] is not None and "labels" not in run.conditions and stored is None:
        raise _Usage("--guidance needs class labels for images: pass --class")
    return bdia.batch.invert_dataset(
        run.model,
        run.ts,
        run.solver,
        a.out,
        input=a.input,
        shard_size=a.batch_size or (None if stored is not None else 100),
        conditions=run.conditions,
        dtype=run.dtype,
        device=run.device,
        description=run.description,
        progress=a.progress,
    )


def _report(command: str, s: bdia.batch.Summary) -> str:
    if s.computed == 0:
        return f"{command}: nothing to do: all {s.shards} shards of {s.out} were there already (verified)"
    return (
        f"{command}: {s.samples} samples in {s.computed} shards -> {s.out} ({s.skipped} of {s.shards} shards were "
        f"there already); {s.world_size} process(es), {s.seconds:.2f} s, {s.samples_per_s:.1f} samples/s; "
        f"writing shards {100 * s.write_share:.1f}% of the time"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done; 1 a run folder that cannot be used, a file that
    cannot be written, e.g. a full disk, or a walk that failed once its network ran; 2 a usage error, naming the
    option, or settings the library refused before any network call)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "demo":
        from bdia.digits import demo

        try:
            return demo.main(argv[1:])
        except SystemExit as e:  # its --help (0) and argument errors (2)
            return e.code if isinstance(e.code, int) else 2
    parser = _parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), bad arguments (2)
        return e.code if isinstance(e.code, int) else 2
    if a.command is None:
        parser.print_usage(sys.stderr)
        print("bdia: error: a command is required (sample, invert, demo)", file=sys.stderr)
        return 2
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        if a.out.exists() and not a.out.is_dir():
            raise _Usage(f"--out {a.out} is an existing file; expected a run folder (a new one, or one to resume)")
        if a.stats is not None and rank0:
            _writable(a.stats, "--stats")
        if a.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
            torch.use_deterministic_algorithms(True)
        a.device = _device(a.device)
        if a.threads is not None or a.device.type == "cpu":
            torch.set_num_threads(a.threads or 1)
        summary = a.run(a)
        if rank0:
            print(_report(a.command, summary), flush=True)
            if a.stats is not None:
                a.stats.write_text(json.dumps({"command": a.command, **summary.as_dict()}, indent=1) + "\n")
    except _Usage as e:
        print(f"bdia {a.command}: error: {e}", file=sys.stderr)
        return 2
    except bdia.batch.Refused as e:  # the library refused the settings or the input, before any network call
        hint = ""
        if getattr(a, "input", None) is not None:
            hint = (
                " (the input run's states record the grid and the solver that made them: leave --steps, --spacing, "
                "--solver, --gamma and --p out to continue them with the run's own)"
            )
        print(f"bdia {a.command}: error: the settings were refused: {e}{hint}", file=sys.stderr)
        return 2
    except (bdia.batch.DatasetError, OSError) as e:  # a folder that cannot be used, a disk that is full
        print(f"bdia {a.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FloatingPointError) as e:  # raised once the network ran: the run failed
        print(f"bdia {a.command}: error: the run failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return 0


if __name__ == "__main__":
    # python -m put the current folder first on the import path; bdia is imported by now, and nothing it imports
    # later (safetensors, ...) may come from there: a folder holding a run is data (--model finds the current
    # folder's modules itself, see _import)
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    sys.exit(main())
