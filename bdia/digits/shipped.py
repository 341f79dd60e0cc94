"""Shipped models: a class-conditional diffusion model of 8x8 digits, its classifier and held-out real digits.

Data: scikit-learn's ``load_digits`` (1,797 8x8 images, values 0..16, 10 classes), scaled to [-1, 1]
(``to_unit``). ``split_indices`` makes the fixed held-out split that both training scripts in
``examples/`` use; the held-out images are shipped in ``bdia/digits/data`` so that nothing here needs scikit-learn.
Weights are torch's own format, loaded with ``weights_only=True`` (no code is unpickled).

``digits()`` is a ready ``bdia.models.Model`` (epsilon prediction, Stable Diffusion's ``scaled_linear``
``DiscreteVP`` with T = 1000; its ``schedule`` attribute is the schedule): call it with ``labels=`` (int64,
``(batch,)``, 0..9, or 10 for unconditional) and pass ``guidance=`` for classifier-free guidance.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from bdia.digits.nets import DigitsClassifier, DigitsDenoiser
from bdia.models import CFG, Model
from bdia.schedules import DiscreteVP

__all__ = [
    "DATA_DIR",
    "NULL_CLASS",
    "classifier",
    "grid",
    "heldout",
    "model",
    "net",
    "schedule",
    "split_indices",
    "to_unit",
]

DATA_DIR = Path(__file__).parent / "data"
DENOISER_FILE, CLASSIFIER_FILE, HELDOUT_FILE = "digits_denoiser.pt", "digits_classifier.pt", "digits_heldout.pt"
NULL_CLASS = DigitsDenoiser.null_class


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Digits pixels 0..16 to [-1, 1], float32, shape ``(N, 1, 8, 8)``."""
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return x / 8.0 - 1.0


def split_indices(labels: torch.Tensor, n_heldout: int = 360, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-stratified random split: ``(train, heldout)`` index tensors (sorted), ``len(heldout) == n_heldout``.

    Each class gives ``round(n_heldout * its share)`` images (then the largest classes adjust the total),
    drawn with a seeded ``torch.Generator``, so the split is the same on every machine.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    n = labels.numel()
    if not (0 < n_heldout < n):
        raise ValueError(f"n_heldout must lie in (0, {n}), got {n_heldout}")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    counts = torch.stack([(labels == c).sum() for c in classes])
    take = (counts.double() * n_heldout / n).round().long()
    order = torch.argsort(counts, descending=True, stable=True)
    for i in range(int((n_heldout - take.sum()).abs())):
        take[order[i % len(order)]] += 1 if take.sum() < n_heldout else -1
    held = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        idx = torch.nonzero(labels == c).flatten()
        held.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    heldout = torch.cat(held).sort().values
    mask = torch.ones(n, dtype=torch.bool)
    mask[heldout] = False
    return torch.nonzero(mask).flatten(), heldout


def _load(name: str, data_dir: Path | str | None) -> dict[str, Any]:
    path = Path(data_dir or DATA_DIR) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the shipped digits files live in bdia/digits/data (re-create them with "
            "examples/train_digits.py and examples/train_classifier.py)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


@functools.lru_cache(maxsize=8)
def schedule(num_train_timesteps: int = 1000) -> DiscreteVP:
    """The schedule the digits model was trained with: ``scaled_linear`` betas 0.00085..0.012 (as SD).

    One object per ``num_train_timesteps`` (schedules never change), so that models rebuilt per request share it
    and its memo of coefficients."""
    return DiscreteVP.stable_diffusion(num_train_timesteps)


def net(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", data_dir: Path | str | None = None
) -> DigitsDenoiser:
    """The shipped denoiser network (eval mode, gradients off)."""
    return _denoiser(_load(DENOISER_FILE, data_dir), dtype, device)


def _denoiser(blob: dict[str, Any], dtype: torch.dtype, device: torch.device | str) -> DigitsDenoiser:
    net = DigitsDenoiser(**blob["config"])
    net.load_state_dict(blob["state_dict"])
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def model(
    guidance: float | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    data_dir: Path | str | None = None,
) -> Model:
    """The shipped class-conditional digits model as a ``bdia.models.Model`` (``.schedule``: its schedule).

    ``guidance``: a classifier-free guidance scale (``None``: the plain conditional model; 1 is the same
    output computed with twice the work; 0 is unconditional). Call the model with ``labels=`` a
    ``(batch,)`` int64 tensor. ``dtype``: the network's (and so the states') dtype, e.g. float64 for
    round trips exact to ~1e-15.
    """
    blob = _load(DENOISER_FILE, data_dir)
    network = _denoiser(blob, dtype, device)
    sched = schedule(blob["config"]["num_train_timesteps"])
    if guidance is None:
        return Model(network, sched, blob["prediction"])
    if isinstance(guidance, bool) or not isinstance(guidance, int | float):
        raise TypeError(f"guidance must be a float scale or None, got {type(guidance).__name__}")
    null = torch.tensor([NULL_CLASS], device=device)
    return Model(CFG(network, float(guidance), labels=null), sched, blob["prediction"])


def classifier(
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", data_dir: Path | str | None = None
) -> DigitsClassifier:
    """The shipped digits classifier (eval mode, gradients off); ``.features(x)`` for the digits-FD."""
    blob = _load(CLASSIFIER_FILE, data_dir)
    net = DigitsClassifier(**blob["config"])
    net.load_state_dict(blob["state_dict"])
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


def heldout(data_dir: Path | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out real digits (never seen by either network): images in [-1, 1] ``(N, 1, 8, 8)``, labels ``(N,)``."""
    blob = _load(HELDOUT_FILE, data_dir)
    return to_unit(blob["images"]), blob["labels"].long()


def grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """Tile ``(N, 1, 8, 8)`` images in [-1, 1] into one ``(H, W)`` float tensor in [0, 1] (1 = ink),
    ``nrow`` images a row, separated by ``pad`` pixels of mid grey."""
    if images.dim() != 4 or images.shape[1:] != (1, 8, 8):
        raise ValueError(f"images must have shape (N, 1, 8, 8), got {tuple(images.shape)}")
    n = images.shape[0]
    rows = (n + nrow - 1) // nrow
    out = torch.full((rows * (8 + pad) + pad, nrow * (8 + pad) + pad), 0.5)
    x = (images.detach().cpu().float().clamp(-1, 1) + 1) / 2
    for i in range(n):
        r, c = divmod(i, nrow)
        y0, x0 = pad + r * (8 + pad), pad + c * (8 + pad)
        out[y0 : y0 + 8, x0 : x0 + 8] = x[i, 0]
    return out
