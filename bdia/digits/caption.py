"""Captions for figures without a plotting library: a 5 x 7 bitmap font drawn into ink images.

``text(s, scale)`` renders a line of text (capitals, digits and ``.,:=-+|()/%``; lower case is drawn as capitals)
as an ``(H, W)`` float tensor in [0, 1], 1 = ink, the convention of ``bdia.digits.grid``; ``Canvas`` places such
images on a white page. The editing demo uses them when matplotlib is not installed, so that its figure still
says which row is which method and which column is what.
"""

from __future__ import annotations

import torch

__all__ = ["GLYPH_HEIGHT", "GLYPH_WIDTH", "Canvas", "text"]

GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
ADVANCE = GLYPH_WIDTH + 1  # one blank column between characters

# each glyph: 7 rows of 5 pixels, top row first ("#" ink)
_GLYPHS = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .###.",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
}


def _bitmap(rows: str) -> torch.Tensor:
    return torch.tensor([[1.0 if c == "#" else 0.0 for c in row] for row in rows.split()])


_BITMAPS = {ch: _bitmap(rows) for ch, rows in _GLYPHS.items()}


def text(s: str, scale: int = 1) -> torch.Tensor:
    """``s`` as an ink image of height ``7 * scale`` and width ``(6 * len(s) - 1) * scale``."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be an int >= 1, got {scale!r}")
    s = s.upper()
    unknown = sorted(set(s) - _BITMAPS.keys())
    if unknown:
        raise ValueError(f"text has characters the caption font lacks: {unknown}; it has {''.join(sorted(_BITMAPS))}")
    out = torch.zeros(GLYPH_HEIGHT, max(ADVANCE * len(s) - 1, 0))
    for i, ch in enumerate(s):
        out[:, i * ADVANCE : i * ADVANCE + GLYPH_WIDTH] = _BITMAPS[ch]
    return out.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


class Canvas:
    """A white ``(height, width)`` page of ink values in [0, 1]; ``put`` copies an image onto it."""

    def __init__(self, height: int, width: int):
        self.ink = torch.zeros(height, width)

    def put(self, image: torch.Tensor, top: int, left: int) -> None:
        """Place ``image`` (H, W) with its top-left corner at ``(top, left)``; it must fit on the page."""
        h, w = image.shape
        if top < 0 or left < 0 or top + h > self.ink.shape[0] or left + w > self.ink.shape[1]:
            raise ValueError(f"a {h} x {w} image at ({top}, {left}) leaves the {tuple(self.ink.shape)} page")
        self.ink[top : top + h, left : left + w] = image
