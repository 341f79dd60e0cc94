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

SOLVERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "bdia": lambda a: bdia.solvers.BDIA(bdia.solvers.DDIM(), gamma=1.0 if a.gamma is None else a.gamma),
    "ddim": lambda a: bdia.solvers.DDIM(),
    "edict": lambda a: bdia.solvers.EDICT(bdia.solvers.DDIM(), p=0.93 if a.p is None else a.p),
    "obelm": lambda a: bdia.solvers.OBELM(),
}


class _Usage(Exception):
    """A command-line argument that cannot be used; reported through the parser (exit status 2)."""


def _user_model(spec: str) -> ModelChoice:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise _Usage(f"--model must be one of {sorted(MODELS)} or module:attribute (a denoiser factory), got {spec!r}")
    try:
        factory = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as e:
        raise _Usage(f"--model {spec}: cannot import it ({e})") from e
    if not callable(factory):
        raise _Usage(f"--model {spec} is not callable: expected factory(device=..., dtype=..., [guidance=...])")

    def build(device: torch.device, dtype: torch.dtype, guidance: float | None) -> Any:
        return factory(device=device, dtype=dtype, **({} if guidance is None else {"guidance": guidance}))

    return ModelChoice(build)


# ------------------------------------------------------------------------------------------------ the parser


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
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
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the input run's; none)")
    g.add_argument(
        "--class",
        dest="cls",
        type=int,
        metavar="C",
        help="condition every sample on class C (model keyword labels=; digits: 0-9, 10 unconditional); default: "
        "the input's labels" + (", else digits cycle 0..9" if task == "sample" else ""),
    )
    g.add_argument("--dtype", choices=["float32", "float64"], help="latent and network dtype (default: the input's)")
    g = p.add_argument_group("grid and solver (default: the input run's)")
    g.add_argument("--steps", type=_positive, help=f"grid steps (default {DEFAULT_STEPS})")
    g.add_argument("--spacing", choices=["leading", "trailing", "linspace"], help=f"default {DEFAULT_SPACING}")
    g.add_argument("--solver", choices=sorted(SOLVERS), help="default bdia")
    g.add_argument("--gamma", type=float, help="BDIA's gamma in [0, 1] (default 1: exactly invertible)")
    g.add_argument("--p", type=float, help="EDICT's mixing weight in (0, 1] (default 0.93)")
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
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
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


def _setup(a: argparse.Namespace, stored: dict[str, Any] | None) -> _Setup:
    """Arguments, completed from the input run's manifest (``stored``), to the objects of a run."""
    before = stored.get("description", {}) if stored else {}
    spec = a.model or before.get("model") or "digits"
    guidance = a.guidance if a.guidance is not None else before.get("guidance")
    solver_name = a.solver or before.get("solver") or "bdia"
    if a.solver is None and before.get("solver") == solver_name:
        a.gamma = before.get("gamma") if a.gamma is None else a.gamma
        a.p = before.get("p") if a.p is None else a.p
    if a.gamma is not None and solver_name != "bdia":
        raise _Usage(f"--gamma applies to --solver bdia only, not {solver_name}")
    if a.p is not None and solver_name != "edict":
        raise _Usage(f"--p applies to --solver edict only, not {solver_name}")
    choice = MODELS.get(spec) or _user_model(spec)
    dtype = getattr(torch, a.dtype or (stored or {}).get("dtype") or "float32")
    device = a.device
    model = choice.build(device, dtype, guidance)
    if not callable(model) or not isinstance(getattr(model, "schedule", None), bdia.schedules.Schedule):
        raise _Usage(f"--model {spec} gave {type(model).__name__}, not a denoiser (callable, with a .schedule)")
    if stored is not None and a.steps is None and a.spacing is None:
        ts = torch.tensor(stored["grid"], dtype=torch.float64)  # the input's grid, to the bit
    else:
        ts = _grid(model.schedule, a.steps or DEFAULT_STEPS, a.spacing)
    solver = SOLVERS[solver_name](a)
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
    }
    return _Setup(model, ts, solver, dtype, device, conditions, description, choice)


def _device(text: str) -> torch.device:
    """``--device``: auto, cpu, cuda (this process's GPU: cuda:LOCAL_RANK) or cuda:N."""
    try:
        device = bdia.batch.default_device() if text == "auto" else torch.device(text)
    except RuntimeError as e:
        raise _Usage(f"--device {text}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Usage(f"--device {text}: this torch sees no CUDA device (use cpu or auto)")
    return bdia.batch.default_device() if device.type == "cuda" and device.index is None else device


def _grid(schedule: Any, steps: int, spacing: str | None) -> torch.Tensor:
    if "spacing" in inspect.signature(schedule.timesteps).parameters:
        return schedule.timesteps(steps, spacing=spacing or DEFAULT_SPACING)
    if spacing is not None:
        raise _Usage(f"--spacing does not apply to {schedule!r}, whose timesteps(n) has no spacing")
    return schedule.timesteps(steps)


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
    return (
        f"{command}: {s.samples} samples in {s.computed} shards -> {s.out} ({s.skipped} of {s.shards} shards were "
        f"there already); {s.world_size} process(es), {s.seconds:.2f} s, {s.samples_per_s:.1f} samples/s; "
        f"writing shards {100 * s.write_share:.1f}% of the time"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 done, 1 a run folder that cannot be used, 2 usage)."""
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
    try:
        if a.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic GEMMs
            torch.use_deterministic_algorithms(True)
        a.device = _device(a.device)
        if a.threads is not None or a.device.type == "cpu":
            torch.set_num_threads(a.threads or 1)
        summary = a.run(a)
    except _Usage as e:
        print(f"bdia {a.command}: error: {e}", file=sys.stderr)
        return 2
    except bdia.batch.DatasetError as e:
        print(f"bdia {a.command}: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_report(a.command, summary), flush=True)
        if a.stats is not None:
            a.stats.write_text(json.dumps({"command": a.command, **summary.as_dict()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
