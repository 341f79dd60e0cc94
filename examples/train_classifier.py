"""Train the shipped digits classifier (``bdia.digits.classifier``), the judge of ``bdia.digits.metrics``.

A small conv net (``bdia.digits.nets.DigitsClassifier``) trained with cross-entropy on the same training split
as the diffusion model (the held-out digits in ``bdia/digits/data`` are excluded and used only to report accuracy),
with random one-pixel shifts as augmentation. Fixed seed, deterministic CPU kernels; about a minute.

    python examples/train_classifier.py
    python examples/train_classifier.py --smoke --out /tmp/x

Needs scikit-learn (for the data set) and the held-out split written by ``examples/train_digits.py``
(or it makes the same split itself when the file is missing in ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bdia import digits
from bdia.digits.nets import DigitsClassifier


def _train_digits_module():
    spec = importlib.util.spec_from_file_location("train_digits", Path(__file__).with_name("train_digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixels along each axis (background -1 fills the gap)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(-1, 1, 8, 10)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(-1, 1, 8, 8)
    return out.gather(3, cols)


def train(args: argparse.Namespace) -> Path:
    td = _train_digits_module()
    out = td.prepare(args)
    images, labels = td.load_digits()
    train_idx, held_idx = digits.split_indices(labels, n_heldout=360, seed=args.split_seed)
    held_file = out / digits.HELDOUT_FILE
    if held_file.is_file():
        saved = torch.load(held_file, weights_only=True)["indices"]
        if not torch.equal(saved, held_idx):
            raise RuntimeError(f"{held_file} holds a different held-out split than --split-seed {args.split_seed}")
    else:
        td.save_heldout(out, images, labels, held_idx, args.split_seed)
    x_tr, y_tr = digits.to_unit(images[train_idx]), labels[train_idx]
    x_te, y_te = digits.to_unit(images[held_idx]), labels[held_idx]

    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        net.train()
        idx = torch.randint(0, x_tr.shape[0], (args.batch,), generator=g)
        loss = F.cross_entropy(net(shift(x_tr[idx], g)), y_tr[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            net.eval()
            with torch.no_grad():
                acc = (net(x_te).argmax(1) == y_te).float().mean().item()
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  held-out acc {acc:.4f}  {time.perf_counter() - t0:.1f}s"
            )
    path = td.save_weights(out / digits.CLASSIFIER_FILE, net.state_dict(), net.config, args, heldout_accuracy=acc)
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB); held-out accuracy {acc:.4f}")
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _train_digits_module().add_common_arguments(p, steps=1500, lr=3e-3)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.log_every = 3, 8, 1
    return args


if __name__ == "__main__":
    train(parse())
