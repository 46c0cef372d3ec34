"""DETR from Hugging Face folders beyond the defaults: the processor's resize and normalisation, the
``auxiliary_loss`` decoder, a backbone ending at an earlier stage (fixtures: fixtures/make_fixtures_detr_hf_more.py);
SETR-MLA's auxiliary heads, the segmentation meter without labelled pixels, ONNX validation in chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from vitlab.data.image import load_image
from vitlab.tasks.metrics import SegmentationMeter, detections_from_outputs
from vitlab.tasks.run import transform_for

FIX = Path(__file__).parent / "fixtures" / "detr_hf_more"
torch.set_num_threads(1)


def test_processor_resize_and_normalisation_give_the_pipelines_detections() -> None:
    """shortest_edge 48 / longest_edge 80 and a non-default rescale + mean/std, on non-square images: the same
    input sizes and detections as processor -> model -> post_process_object_detection."""
    model = vitlab.load_model(FIX / "proc").eval()
    t = transform_for(model, train=False)
    assert (t.size, t.max_size) == (48, 80)
    ref = load_file(FIX / "proc" / "io.safetensors")
    for name in ("wide", "big"):
        img = load_image(FIX / "proc" / f"{name}.png")
        x = t({"image": img})["image"]
        assert tuple(x.shape[-2:]) == tuple(ref[f"{name}_input_hw"].tolist())
        with torch.no_grad():
            out = model(x[None])
        det = detections_from_outputs(out["logits"], out["boxes"], [tuple(img.shape[-2:])], threshold=-1.0)[0]
        assert torch.equal(det["labels"], ref[f"{name}_labels"])
        torch.testing.assert_close(det["scores"], ref[f"{name}_scores"], atol=2e-3, rtol=0)
        # pixels of a 400-wide image: resampling differs a little from PIL's
        torch.testing.assert_close(det["boxes"], ref[f"{name}_boxes"], atol=0.1, rtol=0)


def test_processor_resize_is_kept_in_vitlab_checkpoints(tmp_path) -> None:
    model = vitlab.load_model(FIX / "proc")
    path = tmp_path / "detr.safetensors"
    vitlab.save_model(model, path)
    again = vitlab.load_model(path)
    t = transform_for(again, train=False)
    assert (t.size, t.max_size) == (48, 80)
    # rescale_factor 1/127.5, mean = std = 1: (2x - 1) on [0, 1] pixels
    assert t.mean == pytest.approx((0.5,) * 3) and t.std == pytest.approx((0.5,) * 3)


@pytest.mark.parametrize("folder", ["aux", "stage2"])
def test_outputs_equal_transformers(folder: str) -> None:
    """aux: ``auxiliary_loss: true`` (the decoder norm between layers, the last output normalised twice);
    stage2: ``out_features=["stage2"]`` of a 3-stage ResNet (the backbone ends at its second stage)."""
    io = load_file(FIX / folder / "io.safetensors")
    model = vitlab.load_model(FIX / folder).eval()
    with torch.no_grad():
        out = model(io["x"], io["pixel_mask"])
    torch.testing.assert_close(out["logits"], io["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["boxes"], io["boxes"], atol=1e-5, rtol=1e-5)
    if folder == "aux":
        assert model.cfg.dec_norm_between_layers and out["aux_logits"].shape[0] == 1
    else:
        assert len(model.backbone.stages) == 2


def test_out_features_naming_the_stem_is_refused(tmp_path) -> None:
    import json
    import shutil

    shutil.copytree(FIX / "stage2", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["backbone_config"]["out_features"], cfg["backbone_config"]["out_indices"] = ["stem"], [0]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match=r"out_features=\['stem'\].*ResNet stage"):
        vitlab.load_model(tmp_path / "m")


def test_segmentation_meter_without_labelled_pixels_reports_none() -> None:
    meter = SegmentationMeter(3, ignore_index=255)
    meter.update(torch.tensor([[0, 1], [2, 2]]), torch.full((2, 2), 255))
    s = meter.summary()
    assert s["mIoU"] is None and s["pixel_acc"] is None and s["iou"] == [None, None, None]
    meter.update(torch.tensor([1]), torch.tensor([1]))
    assert meter.summary()["mIoU"] == 1.0 and meter.summary()["pixel_acc"] == 1.0


def test_setr_mla_aux_heads_have_the_official_layout() -> None:
    """The official VIT_MLA_AUXIHead on a 256-wide MLA stream: a 1x1 convolution to the classes, no bias."""
    model = vitlab.create_model("setr_mla_vit_large_patch16", num_classes=5, img_size=32,
                                backbone_args={"depth": 4, "embed_dim": 32, "num_heads": 2})
    sd = {k: v.shape for k, v in model.state_dict().items() if k.startswith("aux_heads.")}
    assert sd == {f"aux_heads.{i}.cls.weight": torch.Size([5, 256, 1, 1]) for i in range(4)}


def test_onnx_validation_runs_in_chunks_with_the_same_outputs() -> None:
    from vitlab.export import onnx as onnx_export

    calls = []

    def fake(x):  # an adapter whose output depends on each image alone
        calls.append(len(x))
        return {"logits": x.mean((2, 3)), "boxes": x.amax((2, 3))}

    x = torch.randn(19, 3, 4, 4)
    got = onnx_export._onnx_outputs(fake, x)
    assert calls == [8, 8, 3]
    whole = fake(x)
    assert all(torch.equal(got[k], whole[k]) for k in whole)
