"""RandAugment against timm's increasing policy ("rand-m9-mstd0.5-inc1", DeiT's): the op list, and each op's
output at fixed magnitudes against timm's (tests/fixtures/randaugment_make_timm.py, random sign fixed to +,
bilinear interpolation, fill 128)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitlab.data import RandAugment
from vitlab.data.functional import Rng
from vitlab.data.randaugment import OPS, TIMM_NAMES, apply_op

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "randaugment_timm.json").read_text())
ARRAYS = dict(np.load(FIXTURES / "randaugment_timm.npz"))
IMAGE = torch.from_numpy(ARRAYS["image"])  # (3, 10, 14) uint8
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")


class PlusRng(Rng):
    """Random signs fixed to +1, as in the fixture."""

    def sign(self) -> float:
        return 1.0


def test_op_list_is_timms_increasing_list() -> None:
    assert [TIMM_NAMES[n] for n in OPS] == META["ops"]  # same ops, same order
    assert len(OPS) == 15 and "identity" not in OPS
    assert RandAugment().ops == list(OPS)


CASES = [(name, level) for name in OPS for level in META["levels"]
         if f"{TIMM_NAMES[name]}@{level:g}" in ARRAYS]


@pytest.mark.parametrize(("name", "level"), CASES)
def test_op_matches_timm(name: str, level: float) -> None:
    ref = torch.from_numpy(ARRAYS[f"{TIMM_NAMES[name]}@{level:g}"]).int()
    got = apply_op(name, IMAGE, level, PlusRng(), fill=128).int()
    if name in GEOMETRIC:
        # Pixels whose bilinear taps all lie inside the image must agree (to rounding), pixels that sample only
        # outside it are the fill; the one-pixel band between differs by design (PIL clamps to the edge and
        # fills past it, grid_sample blends with the fill).
        cover = apply_op(name, torch.full_like(IMAGE, 255), level, PlusRng(), fill=0)
        inside, outside = cover == 255, cover == 0
        assert inside.float().mean() >= 0.45, "the comparison must cover most of the image"
        assert (got - ref).abs()[inside].max() <= 1
        assert torch.equal(got[outside], ref[outside])
    elif name in ("color", "contrast", "brightness", "sharpness", "autocontrast"):
        assert (got - ref).abs().max() <= 1  # PIL truncates, vitlab rounds
    else:  # look-up-table ops are exact
        assert torch.equal(got, ref)


def test_timm_arguments_at_magnitude_9() -> None:
    """The fixture's recorded arguments at DeiT's magnitude, checked here on simple images."""
    args = {k: v["9"] for k, v in META["args"].items()}
    grey = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).expand(3, 16, 16).contiguous()
    # PosterizeIncreasing keeps 4 - int(0.9 * 4) = 1 bit: two grey levels
    assert args["PosterizeIncreasing"] == [1]
    assert sorted(apply_op("posterize", grey, 9.0).unique().tolist()) == [0, 128]
    # SolarizeIncreasing inverts from 256 - int(0.9 * 256) = 26 on
    assert args["SolarizeIncreasing"] == [26]
    out = apply_op("solarize", grey, 9.0).int()
    g = grey.int()
    assert torch.equal(out, torch.where(g >= 26, 255 - g, g))
    # SolarizeAdd adds int(0.9 * 110) = 99 below the threshold 128, capped at 255
    assert args["SolarizeAdd"] == [99]
    out = apply_op("solarize_add", grey, 9.0).int()
    assert torch.equal(out, torch.where(g < 128, (g + 99).clamp(max=255), g))
    assert torch.equal(apply_op("invert", grey, 9.0).int(), 255 - g)
    assert args["ColorIncreasing"] == [pytest.approx(1.81)]
    assert args["Rotate"] == [27.0] and args["ShearX"] == [pytest.approx(0.27)]
    assert args["TranslateXRel"] == [pytest.approx(0.405)]


def test_magnitude_ends() -> None:
    x = IMAGE
    # magnitude 10: posterize keeps no bit (Pillow >= 10 refuses 0 bits, so the fixture lacks it; older Pillow
    # and TensorFlow give black), solarize inverts everything, solarize_add adds 110
    assert META["refused"] == ["PosterizeIncreasing@10: bits must be between or equal to 1 and 8"]
    assert (apply_op("posterize", x, 10.0) == 0).all()
    assert torch.equal(apply_op("solarize", x, 10.0), 255 - x)
    # magnitude 0: posterize keeps 4 bits, the others that use the magnitude do nothing
    assert torch.equal(apply_op("posterize", x, 0.0), x & 0xF0)
    for name in OPS:
        if name not in ("autocontrast", "equalize", "invert", "posterize"):
            assert torch.equal(apply_op(name, x, 0.0, Rng()), x), name


def test_float_images_follow_the_uint8_path() -> None:
    xf = IMAGE.float() / 255
    for name in OPS:
        got = apply_op(name, xf, 9.0, PlusRng())
        assert got.dtype == torch.float32
        assert (got * 255 - apply_op(name, IMAGE, 9.0, PlusRng()).float()).abs().max() <= 1.0, name
