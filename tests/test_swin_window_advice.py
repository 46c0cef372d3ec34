"""Swin's warning on resampled relative-position tables says how to build the checkpoint's model: following its
advice gives a model that loads the file without resampling, with the file's windows in every block. A stage
whose map is smaller than the checkpoint's window clamps its window to the map whatever ``window_size`` says,
so there the advice is a larger ``img_size``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from safetensors.torch import save_file

import vitlab

NAME = "swin_tiny_patch4_window7_224"
ARCH = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), num_classes=3)


def _windows(model) -> list[tuple[int, int]]:
    return [tuple(stage.blocks[0].attn.window) for stage in model.layers]


def _advice(text: str) -> dict:
    """The keyword arguments the warning advises ("... build it with img_size=224 and window_size=7")."""
    found = set(re.findall(r"build it with (.+)$", text, flags=re.M))
    assert len(found) == 1, text
    return {k: ast.literal_eval(v) for k, v in (part.split("=", 1) for part in found.pop().split(" and "))}


@pytest.mark.parametrize(("file_kw", "model_kw", "expected", "clamped"), [
    # swin_tiny at 192 / 160 px: the last stage's map (6x6 / 5x5) is smaller than window 7
    (dict(img_size=224), dict(img_size=192), dict(img_size=224), True),
    (dict(img_size=224), dict(img_size=160), dict(img_size=224), True),
    # another window, and the last stage clamped: both
    (dict(img_size=224), dict(img_size=192, window_size=12), dict(img_size=224, window_size=7), True),
    # a file whose own last window was clamped (192 px: windows 7, 7, 7, 6), loaded at 160 px
    (dict(img_size=192), dict(img_size=160), dict(img_size=192), True),
    # no clamping: the file's window_size
    (dict(img_size=224), dict(img_size=224, window_size=4), dict(window_size=7), False),
    # one stage's window differs: per stage (the last stage's 6x6 map clamps this model's 7 to the file's 6)
    (dict(img_size=192, window_size=(7, 7, 6, 6)), dict(img_size=192), dict(window_size=(7, 7, 6, 7)), False),
])
def test_following_the_window_advice_loads_without_resampling(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             file_kw: dict, model_kw: dict, expected: dict,
                                                             clamped: bool) -> None:
    src = vitlab.create_model(NAME, **ARCH, **file_kw)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with caplog.at_level("WARNING"):
        vitlab.create_model(NAME, pretrained=path, **ARCH, **model_kw)
    assert "resampled to this model's window" in caplog.text
    assert ("smaller than the checkpoint's window" in caplog.text) == clamped
    advice = _advice(caplog.text)
    assert advice == expected
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = vitlab.create_model(NAME, pretrained=path, **ARCH, **{**model_kw, **advice})
    assert "resampled" not in caplog.text
    assert _windows(again) == _windows(src)
