"""Where a windowed-attention block laid its windows: recorded on every forward, read by the analysis tools.

Conventions (those of timm's Swin, which vitlab follows):

* the block's input is a (H, W) token map; with a cyclic shift (sh, sw) the map is rolled by (-sh, -sw)
  first (``shifted[i, j] = x[(i + sh) % H, (j + sw) % W]``), then padded at the bottom and right to
  (Hp, Wp), a multiple of the window (wh, ww);
* windows are ordered row-major over the padded map, batch-major in the attention tensor:
  (B * nW, heads, wh * ww, wh * ww) with nW = (Hp // wh) * (Wp // ww); tokens inside a window row-major;
* the block's output is un-padded and rolled back by (+sh, +sw).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowGeometry:
    """Args:
    size: (H, W) of the token map entering the block.
    padded: (Hp, Wp) after padding to a multiple of ``window``.
    window: (wh, ww) window size actually used (clamped to small maps).
    shift: (sh, sw) cyclic shift; (0, 0) for a block without shift.
    """

    size: tuple[int, int]
    padded: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]

    @property
    def num_windows(self) -> int:
        return (self.padded[0] // self.window[0]) * (self.padded[1] // self.window[1])

    @property
    def window_area(self) -> int:
        return self.window[0] * self.window[1]
