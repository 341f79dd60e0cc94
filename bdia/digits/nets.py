"""Small networks for 8x8 digits: a class-conditional denoiser (with a null class for CFG) and a classifier.

``DigitsDenoiser``: a residual conv net at full 8x8 resolution (no down-sampling: twelve 3x3 convolutions
already see the whole image) whose blocks are modulated (FiLM: Perez et al. 2018) by a sinusoidal time
embedding plus a learned class embedding; class ``null_class`` (10) is the unconditional one that
classifier-free guidance (``bdia.models.CFG``) pairs with. ``DigitsClassifier``: a small conv net whose
penultimate layer (``features``) feeds the digits-FD metric in ``bdia.digits.metrics``. Both are plain
``torch.nn.Module`` s whose forward passes are deterministic on the CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitsClassifier", "DigitsDenoiser", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features of ``t * scale`` (Vaswani et al. 2017; DDPM's time embedding), shape ``(B, dim)``.

    Frequencies run geometrically from 1 to 1/10000, so integer training times 0..999 are told apart
    and fractional times in between get smooth features (the schedule interpolates between them).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float64) / half)
    arg = (t.to(torch.float64) * scale)[:, None] * freqs[None]
    return torch.cat([arg.cos(), arg.sin()], dim=1).to(t.dtype if t.is_floating_point() else torch.float32)


class _Block(nn.Module):
    """Pre-norm residual block: norm, SiLU, conv, FiLM from the embedding, norm, SiLU, conv."""

    def __init__(self, channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return x + self.conv2(F.silu(h))


class DigitsDenoiser(nn.Module):
    """``net(x, t, labels=None) -> output`` for ``bdia.models.Model``: x ``(B, 1, 8, 8)``, t ``(B,)`` in the
    schedule's native time (0..T-1), labels ``(B,)`` int64 in ``0..9`` or ``null_class`` (None: unconditional).
    Labels outside that range are an error (checked here for labels on the CPU, where it costs no device sync; on
    a GPU the embedding's own device-side check stops the call).
    """

    null_class = 10

    def __init__(self, channels: int = 32, blocks: int = 6, emb_dim: int = 128, num_train_timesteps: int = 1000):
        super().__init__()
        if channels % 8:
            raise ValueError(f"channels must be a multiple of 8 (GroupNorm groups), got {channels}")
        self.config = dict(channels=channels, blocks=blocks, emb_dim=emb_dim, num_train_timesteps=num_train_timesteps)
        self.emb_dim = emb_dim
        # time in [0, T) is mapped to [0, 1000): the embedding's frequencies suit that range whatever T is
        self.time_scale = 1000.0 / num_train_timesteps
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(self.null_class + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(_Block(channels, emb_dim, 8) for _ in range(blocks))
        self.norm_out = nn.GroupNorm(8, channels)
        self.conv_out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"x must have shape (batch, 1, 8, 8), got {tuple(x.shape)}")
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        elif (
            not isinstance(labels, torch.Tensor)
            or labels.is_floating_point()
            or labels.is_complex()
            or labels.dtype == torch.bool
        ):
            # a float label would be truncated to a class silently, a bool one read as class 0 or 1
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels must be an integer tensor of classes 0..{self.null_class}, got {got}")
        elif labels.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape ({x.shape[0]},) (one per sample), got {tuple(labels.shape)}")
        elif labels.device.type == "cpu":  # (free on the CPU; elsewhere it would sync, and the embedding checks)
            outside = labels[(labels < 0) | (labels > self.null_class)]
            if outside.numel():
                raise ValueError(
                    f"labels must be classes 0..{self.null_class} ({self.null_class}: unconditional), got "
                    f"{outside[0].item()}"
                )
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim, self.time_scale).to(x.dtype))
        emb = F.silu(emb + self.label_emb(labels.to(device=x.device, dtype=torch.long)))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """A small conv classifier of 8x8 digits in [-1, 1]; ``features(x)`` is its penultimate layer (``feature_dim``)."""

    def __init__(self, channels: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"channels": channels, "feature_dim": feature_dim}
        c = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1),
            nn.GroupNorm(8, c),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
            nn.AvgPool2d(2),  # 4x4
            nn.Conv2d(2 * c, 2 * c, 3, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(2 * c * 16, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, 10)
        self.dropout = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1:] != (1, 8, 8):
            raise ValueError(f"x must have shape (batch, 1, 8, 8), got {tuple(x.shape)}")
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
