"""Train the shipped class-conditional digits diffusion model (``bdia.digits.model``) on scikit-learn's digits.

DDPM training (Ho et al. 2020): epsilon-prediction MSE at uniformly drawn integer times of Stable Diffusion's
``scaled_linear`` schedule (T = 1000), class labels dropped to the null class 10% of the time so the same
network is also the unconditional model of classifier-free guidance (Ho & Salimans 2022); an exponential
moving average of the weights is what gets shipped. Fixed seed, deterministic CPU kernels, a fixed
class-stratified held-out split (``bdia.digits.split_indices``) that is saved next to the weights.

    python examples/train_digits.py            # about 8 minutes on 2 CPU cores
    python examples/train_digits.py --smoke --out /tmp/x   # a few steps, for the test suite

Needs scikit-learn (for the data set), which the library itself does not.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bdia import digits
from bdia.digits.nets import DigitsDenoiser


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as uint8 images ``(N, 8, 8)`` with values 0..16, and int64 labels."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return torch.as_tensor(d.images).to(torch.uint8).reshape(-1, 8, 8), torch.as_tensor(d.target).long()


def save_heldout(out: Path, images: torch.Tensor, labels: torch.Tensor, heldout: torch.Tensor, seed: int) -> None:
    blob = {
        "images": images[heldout].clone(),
        "labels": labels[heldout].to(torch.uint8).clone(),
        "indices": heldout.clone(),  # positions in sklearn.datasets.load_digits()
        "split_seed": seed,
    }
    torch.save(blob, out / digits.HELDOUT_FILE)


def prepare(args: argparse.Namespace) -> Path:
    """Seed, deterministic kernels and thread count (reproducibility), and the output folder: both scripts."""
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(args: argparse.Namespace) -> Path:
    out = prepare(args)

    images, labels = load_digits()
    train_idx, held_idx = digits.split_indices(labels, n_heldout=360, seed=args.split_seed)
    save_heldout(out, images, labels, held_idx, args.split_seed)
    x_all, y_all = digits.to_unit(images[train_idx]), labels[train_idx]

    schedule = digits.schedule(args.timesteps)
    abar = schedule.alphas_cumprod.to(torch.float32)
    net = DigitsDenoiser(channels=args.channels, blocks=args.blocks, num_train_timesteps=args.timesteps)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine decay to 5% of the peak
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        u = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * u)))

    t0, running = time.perf_counter(), 0.0
    for step in range(args.steps):
        idx = torch.randint(0, x_all.shape[0], (args.batch,), generator=g)
        x0, y = x_all[idx], y_all[idx].clone()
        y[torch.rand(args.batch, generator=g) < args.p_uncond] = DigitsDenoiser.null_class
        t = torch.randint(0, args.timesteps, (args.batch,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        loss = F.mse_loss(net(a * x0 + s * eps, t.float(), y), eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory early, when the weights move fast
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            n = (step % args.log_every) + 1
            print(
                f"step {step + 1:5d}  loss {running / n:.4f}  lr {lr_at(step):.2e}  {time.perf_counter() - t0:6.1f}s",
                flush=True,
            )
            running = 0.0

    path = save_weights(
        out / digits.DENOISER_FILE,
        ema.state_dict(),
        net.config,
        args,
        prediction="epsilon",
        schedule="scaled_linear 0.00085..0.012",
    )
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB) after {time.perf_counter() - t0:.1f}s")
    return path


def add_common_arguments(p: argparse.ArgumentParser, *, steps: int, lr: float) -> None:
    """The options both training scripts share (the classifier's script imports this one)."""
    p.add_argument("--out", default=str(digits.DATA_DIR), help="folder for the weights and the held-out digits")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--smoke", action="store_true", help="a few tiny steps (the test suite's check)")


def save_weights(path: Path, state_dict: dict, config: dict, args: argparse.Namespace, **extra) -> Path:
    """Weights, the network's config and the training options (not the output folder: no absolute paths)."""
    train = {k: v for k, v in vars(args).items() if isinstance(v, int | float | str) and k != "out"}
    blob = {"state_dict": {k: v.clone() for k, v in state_dict.items()}, "config": config, **extra, "train": train}
    torch.save(blob, path)
    return path


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, steps=3000, lr=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--timesteps", type=int, default=1000)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.warmup, args.log_every = 3, 8, 1, 1
    return args


if __name__ == "__main__":
    train(parse())
