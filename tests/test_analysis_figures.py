"""Figures are valid PNGs of the stated size; the HTML report links files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from vitlab.analysis.figures import (
    attention_distance_figure,
    explain_figure,
    filters_figure,
    position_similarity_figure,
)
from vitlab.analysis.report import Section, write_report


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        im.load()
        return im.size


@pytest.mark.parametrize("channels", [1, 3])
def test_explain_figure_size(tmp_path: Path, channels: int) -> None:
    out = explain_figure(torch.rand(channels, 32, 24), torch.rand(32, 24), tmp_path / "e.png", title="cat (91%)",
                         size=(600, 230))
    assert _png_size(out) == (600, 230)


def test_analysis_figures_sizes(tmp_path: Path) -> None:
    d = attention_distance_figure(torch.rand(4, 3) * 30, tmp_path / "d.png", size=(500, 400))
    assert _png_size(d) == (500, 400)
    d2 = attention_distance_figure(torch.rand(2, 20), tmp_path / "d2.png", layers=[1, 3])  # > 16 heads: no legend
    assert _png_size(d2) == (640, 480)
    sim = torch.rand(12, 12)
    p = position_similarity_figure(sim, (3, 4), tmp_path / "sub" / "p.png", size=(420, 380))
    assert _png_size(p) == (420, 380)
    for c in (1, 3, 2):
        f = filters_figure(torch.randn(10, c, 4, 4), tmp_path / f"f{c}.png", size=(300, 200))
        assert _png_size(f) == (300, 200)


def test_report_links_existing_files(tmp_path: Path) -> None:
    fig = attention_distance_figure(torch.rand(2, 2), tmp_path / "dist.png")
    report = write_report(tmp_path / "report.html", title="t <&>", meta=[("command", "vitlab analyze --x 'a b'")],
                          sections=[Section(title="dist", figure=fig.name, text="x < y",
                                            table=[["layer", "d"], [1, 0.123456], [2, 3.0]])])
    text = report.read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", text)
    assert links and all((tmp_path / link).is_file() for link in links)
    assert "t &lt;&amp;&gt;" in text and "0.1235" in text and "x &lt; y" in text
