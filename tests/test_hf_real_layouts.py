"""Hugging Face checkpoints at their published sizes load key for key (fixtures/hf_real_layouts.json.gz: the
config.json and the saved layout of 13 checkpoints, no weights; make_fixtures_hf_real_layouts.py).

The tiny HF fixtures check the numbers; these check the size-dependent parts of each converter that tiny models
do not reach: MobileViT-S's and -XXS's channel lists, DETR's full ResNet-50 (in transformers' v4 names), Swin-B's
18-block stage, ViT-L and ViT-H (with its pooler), a distilled DeiT's two heads, BEiT's per-layer tables.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

import vitlab

FIX = Path(__file__).resolve().parent / "fixtures"
with gzip.open(FIX / "hf_real_layouts.json.gz", "rt") as _f:
    CASES = json.load(_f)["cases"]

EXPECTED = {  # the registered family each folder builds, its classes, and a size the config sets
    "vit_base": ("vit_base_patch16_224", 1000, 224), "vit_base_384_p32": ("vit_base_patch16_224", 1000, 384),
    "vit_large_384": ("vit_base_patch16_224", 1000, 384), "vit_huge_in21k": ("vit_base_patch16_224", 0, 224),
    "deit_base_distilled": ("deit_base_patch16_224", 1000, 224), "beit_base": ("beit_base_patch16_224", 1000, 224),
    "swin_tiny": ("swin_tiny_patch4_window7_224", 1000, 224),
    "swin_base_384": ("swin_tiny_patch4_window7_224", 1000, 384),
    "swinv2_tiny": ("swinv2_tiny_window8_256", 1000, 256), "mobilevit_small": ("mobilevit_s", 1000, 256),
    "mobilevit_xx_small": ("mobilevit_xxs", 1000, 256), "mobilevitv2_1.0": ("mobilevitv2_100", 1000, 256),
    "detr_resnet50": ("detr_resnet50", 91, 800),
}


def test_every_case_has_an_expectation():
    assert {c["name"] for c in CASES} == set(EXPECTED)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_published_hugging_face_folder_loads_strictly(tmp_path, monkeypatch, case):
    import vitlab.checkpoints.load as load

    (tmp_path / "config.json").write_text(json.dumps(case["config"]))
    (tmp_path / "model.safetensors").write_bytes(b"")
    # layer-scale values are read by value (BEiT's init_values): real, small; the rest on the meta device
    sd = {k: torch.full(shape, 0.1) if "lambda" in k else torch.empty(shape, device="meta")
          for k, shape in case["layout"].items()}
    monkeypatch.setattr(load, "read_vitlab", lambda path: None)
    monkeypatch.setattr(load, "read_safetensors", lambda path: (dict(sd), {}))
    with torch.device("meta"):
        model = vitlab.load_model(tmp_path)  # strict: every tensor of the file placed, every parameter filled
    name, classes, size = EXPECTED[case["name"]]
    assert model.model_name == name and model.num_classes == classes
    assert model.preprocessing.input_size[1] == size
    if case["name"] == "deit_base_distilled":
        assert model.cfg.distilled and model.cfg.dist_head  # the teacher-distilled head is kept, not dropped
