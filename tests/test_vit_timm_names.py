"""timm's ViT names whose architecture vitlab has: each builds with timm's parameter count and defaults. DeiT III's
names (``deit3_*``: timm's VisionTransformer without a class-token position, with LayerScale) are DeiT's.

The expected numbers come from timm itself (tests/fixtures/make_fixtures_timm_vit_names.py, run with the
peer environment); models are built on the meta device, so the giant ones cost nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.models.registry import get_entry, list_models
from vitlab.models.vit import TIMM_VIT_LAYOUTS

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "timm_vit_names.json").read_text())["models"]


def test_every_timm_layout_is_registered_and_in_the_fixture():
    assert set(TIMM_VIT_LAYOUTS) <= set(list_models("vit_*"))
    assert set(TIMM_VIT_LAYOUTS) <= set(FIXTURE)


def test_every_timm_deit3_name_is_registered():
    """The fixture lists every name timm.list_models("deit3_*") gives; vitlab registers exactly those."""
    timm_names = {n for n in FIXTURE if n.startswith("deit3_")}
    assert len(timm_names) == 8
    assert set(list_models("deit3_*")) == timm_names


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_timm_name_builds_with_timms_parameter_count(name):
    expected = FIXTURE[name]
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert model.num_classes == expected["num_classes"]
    assert sum(p.numel() for p in model.parameters()) == expected["params"]
    pre = model.preprocessing
    assert list(pre.input_size) == expected["input_size"]
    assert list(pre.mean) == pytest.approx(expected["mean"]) and list(pre.std) == pytest.approx(expected["std"])
    assert pre.crop_pct == pytest.approx(expected["crop_pct"])
    assert get_entry(name).family == ("deit" if name.startswith("deit3_") else "vit")
