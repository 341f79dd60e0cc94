"""The main job, ``python -m bdia demo``: edit real digits through exact inversion (or ``--model gmm`` round trips).

Default, ``--model digits``: the shipped class-conditional model (``bdia.digits.model``) takes held-out real
digits (one of each class), inverts each with its true class over a ``trailing`` grid, then samples from the
inverted state twice: with the true class (the reconstruction) and with another class (the edit). Methods:
DDIM inversion (approximate: each inversion step evaluates the model at the wrong end of the step), BDIA
gamma = 1 and EDICT p = 0.93 (exact: the only approximation is BDIA's first plain step from the data, which
sampling undoes exactly). It writes one figure (original | reconstruction | edit, one row per method) and
prints reconstruction error, NFE and time per method; under a minute on two CPU cores.

``--model gmm``: an analytic Gaussian mixture (docs/theory.md) under Stable Diffusion's discrete schedule
(leading grid, ending at abar[0]); its exact denoiser makes the numbers about the solvers alone.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from bdia import digits
from bdia.batch import write_png as write_image
from bdia.digits import caption
from bdia.models import CountNFE, GaussianMixture
from bdia.report import format_table, relative_error
from bdia.sampling import invert, sample
from bdia.schedules import DiscreteVP
from bdia.solvers import BDIA, DDIM, EDICT, DDIMInverse


def gmm_methods():
    return {
        "DDIM inversion": DDIMInverse(),
        "BDIA gamma=1": BDIA(DDIM(), gamma=1.0),
        "BDIA gamma=0.5": BDIA(DDIM(), gamma=0.5),
    }


def run_gmm(steps: int, batch: int, dim: int, dtype: torch.dtype, seed: int) -> list[dict]:
    schedule = DiscreteVP.stable_diffusion()
    ts = schedule.timesteps(steps, "leading", steps_offset=1)
    model = CountNFE(GaussianMixture.random(schedule, dim=dim, components=8, std=0.2, seed=seed))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, dim, generator=g, dtype=torch.float64).to(dtype)
    data = model.model.sample(batch, generator=g).to(dtype)

    rows = []
    for name, solver in gmm_methods().items():
        model.calls = 0
        t0 = time.perf_counter()
        out = sample(model, noise, ts, solver)
        nfe = model.calls
        # gamma < 1 inverts past the default amplification bound, which refuses it: run it anyway, to show why
        back = invert(model, out, ts, solver, max_amplification=math.inf)
        z = invert(model, data, ts, solver, max_amplification=math.inf)
        rec = sample(model, z, ts, solver)
        elapsed = time.perf_counter() - t0
        rows.append(
            {
                "method": name,
                "NFE": nfe,
                "noise->sample->invert": relative_error(back.x, noise),
                "data->invert->sample": relative_error(rec.x, data),
                "inversion refused by default": "yes"
                if solver.amplification(schedule, ts.tolist(), False) > 1 / torch.finfo(dtype).eps
                else "no",
                "time [s]": elapsed,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(format_table(rows))


def digits_methods() -> dict:
    return {
        "DDIM inversion": DDIMInverse(),
        "BDIA gamma=1": BDIA(DDIM(), gamma=1.0),
        "EDICT p=0.93": EDICT(DDIM(), p=0.93, alternate=True),
    }


def pick_digits(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out digits of classes 0, 1, ..., 9, 0, 1, ... in turn (the k-th of a class on its k-th visit)."""
    x, y = digits.heldout()
    by_class = [torch.nonzero(y == c).flatten() for c in range(10)]
    sel = torch.stack([by_class[k % 10][k // 10] for k in range(count)])
    return x[sel], y[sel]


def run_digits(
    steps: int, count: int, shift: int, guidance: float | None, strength: float, dtype: torch.dtype
) -> tuple[list[dict], dict]:
    model = CountNFE(digits.model(guidance=guidance, dtype=dtype))
    x, y = pick_digits(count)
    x = x.to(dtype)
    target = (y + shift) % 10
    ts = model.schedule.timesteps(steps, "trailing")
    with torch.no_grad():  # one warm-up call, so that the first method's time does not carry the kernels' set-up
        model(x, float(ts[0]), labels=y)
    rows, panels = [], {}
    for name, solver in digits_methods().items():
        t0 = time.perf_counter()
        with torch.no_grad():
            model.calls = 0
            z = invert(model, x, ts, solver, strength=strength, labels=y)
            nfe_inv = model.calls
            model.calls = 0
            rec = sample(model, z, ts, solver, strength=strength, labels=y).x
            nfe_rec = model.calls
            edit = sample(model, z, ts, solver, strength=strength, labels=target).x
        elapsed = time.perf_counter() - t0
        err = (rec.double() - x.double()).abs()
        rows.append(
            {
                "method": name,
                "NFE invert+sample": f"{nfe_inv}+{nfe_rec}",
                "max |rec - x|": float(err.max()),
                "RMS rec error": float(err.pow(2).mean().sqrt()),
                "edit is target (classifier)": "",
                "time [s]": elapsed,
            }
        )
        panels[name] = (rec, edit)
    clf = digits.classifier(dtype=dtype)
    with torch.no_grad():
        for row, (_, edit) in zip(rows, panels.values(), strict=True):
            row["edit is target (classifier)"] = f"{int((clf(edit.clamp(-1, 1)).argmax(1) == target).sum())}/{count}"
    return rows, {"x": x, "labels": y, "target": target, "panels": panels}


ERROR_GAIN = 4.0  # the error panel shows |rec - x| times this (one grey level of 0..16 is 0.125 in [-1, 1])


def write_png(path: Path, image: torch.Tensor) -> None:
    """A grey-scale 8-bit PNG of ``image`` (H, W) in [0, 1] (1 = ink, drawn black), with the standard library only."""
    write_image(path, (1.0 - 2.0 * image.clamp(0, 1))[None])  # [0, 1] ink -> [-1, 1] brightness


def save_figure(path: Path, result: dict, rows: list[dict], title: str) -> None:
    """original | reconstruction | its error (amplified) | edit, one row per method, captioned: with matplotlib
    when it is installed, else drawn with a built-in bitmap font (``bdia.digits.caption``)."""
    n, x = result["x"].shape[0], result["x"]

    def error_image(rec: torch.Tensor) -> torch.Tensor:  # |rec - x| * ERROR_GAIN as ink on [-1, 1]
        return ((rec - x).abs() * ERROR_GAIN).clamp(0, 1) * 2 - 1

    strips = {name: [x, rec, error_image(rec), edit] for name, (rec, edit) in result["panels"].items()}
    labels = [result["labels"].tolist(), None, None, result["target"].tolist()]  # each column's classes
    row_names = [(name, f"max err {row['max |rec - x|']:.1e}") for name, row in zip(strips, rows, strict=True)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        write_png(path, bitmap_figure(strips, labels, row_names, title, n))
        return
    heads = [f"|{COLUMNS[1]} - {COLUMNS[0]}| x {ERROR_GAIN:g}" if j == 2 else c for j, c in enumerate(COLUMNS)]
    cols = [h + (": " + " ".join(map(str, c)) if c else "") for h, c in zip(heads, labels, strict=True)]
    fig, axes = plt.subplots(len(strips), 4, figsize=(4 * 0.42 * n + 1.8, 0.62 * len(strips) + 0.9), squeeze=False)
    for i, name in enumerate(strips):
        for j, images in enumerate(strips[name]):
            ax = axes[i, j]
            ax.imshow(digits.grid(images, n).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i, 0].set_ylabel("\n".join(row_names[i]), rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COLUMNS = ("original", "reconstruction", "error", "edit")


def bitmap_figure(
    strips: dict[str, list[torch.Tensor]],
    labels: list[list[int] | None],
    row_names: list[tuple[str, str]],
    title: str,
    n: int,
    scale: int = 6,
    text_scale: int = 2,
) -> torch.Tensor:
    """The demo's figure as one ink image (1 = black), captioned with the bitmap font: the title, each column's
    name with the class of every digit above it, and each row's method and error at its left."""
    line, gap = caption.GLYPH_HEIGHT * text_scale, 3 * text_scale
    cell = 9 * scale  # an 8-pixel digit and its 1-pixel frame, scaled
    strip_h, strip_w = 10 * scale, (9 * n + 1) * scale
    heads = [f"|{COLUMNS[1]} - {COLUMNS[0]}| x {ERROR_GAIN:g}" if j == 2 else c for j, c in enumerate(COLUMNS)]
    heads = [h + (" (class above each)" if j == 0 else " (new class)" if j == 3 else "") for j, h in enumerate(heads)]
    names = [[caption.text(t, text_scale) for t in pair] for pair in row_names]
    head_inks = [caption.text(h, text_scale) for h in heads]
    title_ink = caption.text(title, text_scale)
    left = 2 * gap + max(t.shape[1] for pair in names for t in pair)
    pitch = max(strip_w, *(t.shape[1] for t in head_inks)) + 4 * gap  # a column: its strip or its name, if wider
    width = max(left + 4 * pitch, title_ink.shape[1] + 2 * gap)
    head_y = 3 * gap + line  # the title, then a wider gap
    class_y = head_y + line + gap
    top = class_y + line + gap
    page = caption.Canvas(top + len(strips) * (strip_h + 2 * gap), width)
    page.put(title_ink, gap, gap)
    for j, head in enumerate(head_inks):
        x0 = left + j * pitch
        page.put(head, head_y, x0)
        for i, c in enumerate(labels[j] or []):  # centred over its digit
            glyph = caption.text(str(c), text_scale)
            page.put(glyph, class_y, x0 + scale + i * cell + (8 * scale - glyph.shape[1]) // 2)
    for r, (name, row) in enumerate(zip(strips, names, strict=True)):
        y0 = top + r * (strip_h + 2 * gap)
        page.put(row[0], y0 + strip_h // 2 - line - gap // 2, gap)
        page.put(row[1], y0 + strip_h // 2 + gap // 2, gap)
        for j, images in enumerate(strips[name]):
            big = digits.grid(images, n).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
            page.put(big, y0, left + j * pitch)
    return page.ink


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bdia demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=["digits", "gmm"], default="digits")
    p.add_argument("--steps", type=int, default=None, help="grid steps (default: 20 for digits, 50 for gmm)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    g = p.add_argument_group("digits")
    g.add_argument("--count", type=int, default=10, help="how many held-out digits (classes 0..9 in turn)")
    g.add_argument("--shift", type=int, default=1, help="the edit's class is (true class + shift) mod 10")
    g.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1: none)")
    g.add_argument("--strength", type=float, default=1.0, help="fraction of the grid inverted (1 = down to noise)")
    g.add_argument("--out", type=Path, default=Path("digits_edit.png"), help="where the figure goes")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the demo's tensors are tiny, and on a busy machine a thread pool spins "
        "waiting for cores instead of computing; see docs/digits.md)",
    )
    g = p.add_argument_group("gmm")
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1")
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    a.steps = a.steps if a.steps is not None else {"digits": 20, "gmm": 50}[a.model]
    if a.model == "gmm":
        print(
            f"Gaussian mixture (8 components, dim {a.dim}), SD schedule, {a.steps} leading steps, {a.dtype}, "
            f"batch {a.batch}; relative round-trip errors (0 = exact), time for the four walks"
        )
        print_table(run_gmm(a.steps, a.batch, a.dim, dtype, a.seed))
        return 0
    if a.count < 1 or a.steps < 1:
        p.error("--count and --steps must be >= 1")
    t0 = time.perf_counter()
    guidance = None if a.guidance == 1 else a.guidance  # scale 1 is the conditional model: skip the extra work
    rows, result = run_digits(a.steps, a.count, a.shift, guidance, a.strength, dtype)
    cfg = "no guidance" if guidance is None else f"CFG {guidance:g}"
    title = (
        f"Held-out digits inverted with their class, resampled with class + {a.shift} "
        f"({a.steps} trailing steps, strength {a.strength:g}, {cfg}, {a.dtype})"
    )
    print(title + "; errors in pixel units of [-1, 1] (one grey level of 0..16 is 0.125)")
    print_table(rows)
    save_figure(a.out, result, rows, title)
    print(f"figure: {a.out}  (total {time.perf_counter() - t0:.1f} s)")
    return 0
