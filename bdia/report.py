"""Measures and tables shared by the demo, the benchmarks and the tests: relative errors and plain-text tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["fmt", "format_table", "relative_error"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 over all elements; ``inf`` when it is not finite (NaN in ``a``, say)."""
    e = float((a.double() - b.double()).norm() / b.double().norm())
    return e if math.isfinite(e) else math.inf


def fmt(v: Any) -> str:
    """A number as a table shows it: 3 significant digits, scientific outside [1e-3, 1e4)."""
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Rows (dicts with the same keys) as a markdown table, under ``title`` if given."""
    if not rows:
        return ""
    keys = list(rows[0])
    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = [
        "| " + " | ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
        *("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |" for c in cells),
    ]
    return (f"{title}\n" if title else "") + "\n".join(lines)
