"""Hugging Face CLIP / SigLIP vision folders (CLIPVisionModel, CLIPVisionModelWithProjection, CLIPModel's vision tower;
SiglipVisionModel, SiglipModel's) read as vitlab's CLIP / SigLIP ViTs, and ViTs whose img_size is not a multiple of
the patch (timm's floor grid: SigLIP so400m/14 at 384 px).

Reference outputs: transformers 5 and timm (tests/fixtures/make_fixtures_hf_clip_siglip.py): last_hidden_state
(CLIP's before post_layernorm: vitlab's last block; SigLIP's after it: forward_features), pooler_output (the headless
features) and CLIP's image_embeds (the projection: vitlab's head), at the config's size and, with
interpolate_pos_encoding=True, at 48 and 24 px.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.checkpoints.converters import hf_model_name
from vitlab.data import eval_transform, load_image

FIX = Path(__file__).resolve().parent / "fixtures"
HF = FIX / "hf_clip_siglip"
IO = load_file(str(HF / "io.safetensors"))
ATOL = 1e-5
CLIP = {"clip_vision": ("quick", 0), "clip_proj": ("exact", 16), "clip_full": ("quick", 16)}  # gelu, head width


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= ATOL


def _clip_last(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' CLIP last_hidden_state: the last block's tokens, class token first, before the final norm."""
    _, inter = m.forward_intermediates(x, indices=1, return_prefix_tokens=True)
    tokens, prefix = inter[0]
    return torch.cat([prefix, tokens], dim=1)  # (B, 1 + N, D)


def _models(folder: Path, size: int, native: int) -> list[torch.nn.Module]:
    """The folder at its size; at another, built there (table resampled at load) and with dynamic_img_size."""
    if size == native:
        return [vitlab.load_model(folder).eval()]
    return [vitlab.load_model(folder, img_size=size).eval(), vitlab.load_model(folder, dynamic_img_size=True).eval()]


@pytest.mark.parametrize("tag", sorted(CLIP))
@pytest.mark.parametrize("size", [32, 48, 24])
def test_hf_clip_folder_gives_transformers_outputs(tag, size):
    gelu, width = CLIP[tag]
    x = IO[f"input_{size}"]
    for m in _models(HF / tag, size, 32):
        assert (m.cfg.pre_norm, m.cfg.gelu, m.global_pool, m.num_classes) == (True, gelu, "token", width)
        assert m.model_name == f"vit_base_patch32_clip{'_quickgelu' if gelu == 'quick' else ''}_224"
        assert not m.cfg.pos_antialias and m.patch_embed.proj.bias is None
        with torch.no_grad():
            _close(_clip_last(m, x), IO[f"{tag}_last_{size}"])
            feats = m.forward_features(x)
            _close(m.forward_head(feats, pre_logits=True), IO[f"{tag}_pooler_{size}"])
            if width:  # visual_projection is the head: forward gives image_embeds
                _close(m(x), IO[f"{tag}_embeds_{size}"])
            else:
                _close(m(x), IO[f"{tag}_pooler_{size}"])


@pytest.mark.parametrize("tag", ["siglip_vision", "siglip_full"])
@pytest.mark.parametrize("size", [32, 48, 24])
def test_hf_siglip_folder_gives_transformers_outputs(tag, size):
    x = IO[f"input_{size}"]
    for m in _models(HF / tag, size, 32):
        assert m.model_name == "vit_base_patch16_siglip_224"
        assert (m.cfg.class_token, m.cfg.gelu, m.global_pool, m.num_classes) == (False, "tanh", "map", 0)
        with torch.no_grad():
            _close(m.forward_features(x), IO[f"{tag}_last_{size}"])
            _close(m(x), IO[f"{tag}_pooler_{size}"])


def _siglip_copy(tmp_path: Path, **config: object) -> Path:
    folder = tmp_path / "siglip"
    folder.mkdir()
    cfg = json.loads((HF / "siglip_vision" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    sd = load_file(str(HF / "siglip_vision" / "model.safetensors"))
    if config.get("vision_use_head") is False:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    save_file(sd, str(folder / "model.safetensors"))
    return folder


def test_hf_siglip_folder_without_its_head_reads_as_the_gap_layout(tmp_path):
    """vision_use_head=False (PaliGemma's towers): no pooler_output in transformers; vitlab's "_gap" layout (the
    normalised tokens averaged), whose tokens are last_hidden_state."""
    m = vitlab.load_model(_siglip_copy(tmp_path, vision_use_head=False)).eval()
    assert m.model_name == "vit_base_patch16_siglip_gap_224" and m.global_pool == "avg" and m.attn_pool is None
    x = IO["input_32"]
    with torch.no_grad():
        last = m.forward_features(x)
        _close(last, IO["siglip_vision_last_32"])
        _close(m(x), last.mean(dim=1))


@pytest.mark.parametrize("size", [36, 48, 24])
def test_hf_siglip_folder_whose_size_leaves_a_remainder_gives_transformers_outputs(tmp_path, size):
    """image_size 36, patch 8 (SigLIP so400m/14 at 384 px in small): a 4 x 4 grid, the last 4 pixels unused."""
    folder = _siglip_copy(tmp_path, image_size=36)
    x = IO[f"input_{size}"]
    for m in _models(folder, size, 36):
        if m.cfg.img_size == 36:
            assert m.patch_embed.grid_size == (4, 4)
        with torch.no_grad():
            _close(m.forward_features(x), IO[f"siglip_36_last_{size}"])
            _close(m(x), IO[f"siglip_36_pooler_{size}"])


@pytest.mark.parametrize("tag", ["clip", "siglip"])
def test_hf_processor_file_gives_the_processors_pixels(tag):
    """CLIPImageProcessor (shortest edge 36, centre crop 32, bicubic, OpenAI's mean / std) and SiglipImageProcessor
    (32 x 32 without a crop, mean / std 0.5): the loaded model's eval transform gives their pixel_values up to the
    resize kernels' rounding (transformers resizes uint8 images); the names' defaults differ by 0.25 on average."""
    m = vitlab.load_model(HF / f"{tag}_vision")
    transform = eval_transform(m.preprocessing)
    for i in range(2):
        diff = (transform(load_image(FIX / "hf_processor" / f"img{i}.png")) - IO[f"proc_{tag}"][i]).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.2, (tag, i, diff.mean().item(), diff.max().item())


@pytest.mark.parametrize(("model_type", "config", "name"), [
    ("clip", {"vision_config": {"hidden_size": 768, "patch_size": 32}}, "vit_base_patch32_clip_quickgelu_224"),
    ("clip", {"vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14}},
     "vit_large_patch14_clip_quickgelu_336"),
    ("clip_vision_model", {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                           "num_attention_heads": 16, "patch_size": 14, "hidden_act": "gelu"},
     "vit_huge_patch14_clip_224"),
    ("siglip_vision_model", {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                             "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
     "vit_so400m_patch14_siglip_384"),
    ("siglip", {"vision_config": {"image_size": 512}}, "vit_base_patch16_siglip_512"),
    ("siglip", {"vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                  "num_attention_heads": 16, "image_size": 448, "patch_size": 14,
                                  "vision_use_head": False}}, "vit_so400m_patch14_siglip_gap_448"),
    ("siglip_vision_model", {"hidden_size": 48}, "vit_base_patch16_siglip_224"),  # no named width: base, resized
])
def test_hf_tower_config_picks_the_registered_name_of_its_size(model_type, config, name):
    assert hf_model_name(model_type, {"model_type": model_type, **config}) == name


def test_so400m_at_384_px_config_builds_timms_grid():
    """google/siglip-so400m-patch14-384's config: 27 x 27 patches of 14 px (6 pixels unused), the head's MLP 4304."""
    from vitlab.checkpoints.convert_hf import hf_tower_overrides
    from vitlab.models.registry import get_entry

    config = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
              "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14}
    over = hf_tower_overrides(config)
    with torch.device("meta"):
        m = vitlab.create_model("vit_so400m_patch14_siglip_384", **over)
        assert m.patch_embed.grid_size == (27, 27) and m.pos_embed.shape == (1, 729, 1152)
        assert m.blocks[0].mlp.fc1.out_features == 4304 and m.attn_pool.mlp.fc1.out_features == 4304
    assert get_entry("vit_so400m_patch14_siglip_384").config.img_size == 384
    # a width whose ratio rounds below it in float (int(224 * (230 / 224)) == 229) keeps the config's MLP width
    odd = hf_tower_overrides({"model_type": "siglip_vision_model", "hidden_size": 224, "intermediate_size": 230,
                              "num_attention_heads": 2, "num_hidden_layers": 1})
    with torch.device("meta"):
        m = vitlab.create_model("vit_base_patch16_siglip_224", **odd)
    assert m.blocks[0].mlp.fc1.out_features == 230 and m.attn_pool.mlp.fc1.out_features == 230


def test_hf_tower_classifier_and_unknown_activation_are_refused_by_name(tmp_path):
    folder = tmp_path / "cls"
    shutil.copytree(HF / "siglip_vision", folder)
    sd = {f"vision_model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    save_file({**sd, "classifier.weight": torch.zeros(3, 32), "classifier.bias": torch.zeros(3)},
              str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="SiglipForImageClassification"):
        vitlab.load_model(folder)
    act = _siglip_copy(tmp_path, hidden_act="relu")
    with pytest.raises(CheckpointError, match="hidden_act='relu'"):
        vitlab.load_model(act)


# ------------------------------------------------------------------- img_size not a multiple of the patch
TIMM_36 = dict(img_size=36, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5,
               drop_remainder=True)


def test_timm_vit_whose_img_size_leaves_a_remainder_gives_timms_logits(tmp_path):
    """timm builds img_size=36 with 8 px patches as a 4 x 4 grid and ignores the last 4 pixel rows / columns; so does
    vitlab, fixed-size and (other sizes multiples of the patch, as timm's) with dynamic_img_size."""
    m = vitlab.create_model("vit_base_patch16_224", pretrained=HF / "timm_36.safetensors", **TIMM_36).eval()
    dyn = vitlab.create_model("vit_base_patch16_224", pretrained=HF / "timm_36.safetensors", **TIMM_36,
                              dynamic_img_size=True).eval()
    assert m.patch_embed.grid_size == (4, 4) and m.preprocessing.input_size == (3, 36, 36)
    with torch.no_grad():
        _close(m(IO["input_36"]), IO["timm36_logits_36"])
        _close(dyn(IO["input_48"]), IO["timm36_dyn_48"])
        _close(dyn(IO["input_36"]), IO["timm36_logits_36"])
    with pytest.raises(ValueError, match="input image is 40x40 but this model was built for 36x36"):
        m(torch.zeros(1, 3, 40, 40))
    with pytest.raises(ValueError, match="input image 44x44 is not divisible by the patch size 8x8"):
        dyn(torch.zeros(1, 3, 44, 44))
    # a timm hub folder (its model_args: img_size 36, patch 8) is built as timm builds it
    from vitlab.checkpoints import save_timm_folder

    save_timm_folder(m, tmp_path / "hub")
    assert "drop_remainder" not in json.loads((tmp_path / "hub" / "config.json").read_text())["model_args"]
    with torch.no_grad():
        _close(vitlab.load_model(tmp_path / "hub").eval()(IO["input_36"]), IO["timm36_logits_36"])
    # a plain state dict does not say it: asked for, not assumed (a size typed by mistake stays an error)
    with pytest.raises(ValueError, match=r"img_size 36x36 is not a multiple of the patch size 8: .*drop_remainder=True"):
        vitlab.create_model("vit_base_patch16_224", pretrained=HF / "timm_36.safetensors",
                            **{**TIMM_36, "drop_remainder": False})


def test_onnx_export_of_a_remainder_model_is_fixed_size(tmp_path):
    """A fixed-size export equals PyTorch; a dynamic-size one is refused with the reason (its own size is no multiple
    of the patch, which every other size must be)."""
    pytest.importorskip("onnxruntime")
    from vitlab.export import ExportError, OnnxModel, export_onnx

    m = vitlab.create_model("vit_base_patch16_224", pretrained=HF / "timm_36.safetensors", **TIMM_36).eval()
    with pytest.raises(ExportError, match="img_size 36x36 is not a multiple of the patch 8x8"):
        export_onnx(m, tmp_path / "d.onnx", dynamic_size=True, num_images=2, timing=False)
    report = export_onnx(m, tmp_path / "f.onnx", num_images=2, timing=False)
    assert report.max_abs_diff < 1e-4
    onnx_model = OnnxModel(tmp_path / "f.onnx")
    assert onnx_model.input_hw == (36, 36)
    _close(onnx_model(IO["input_36"]), IO["timm36_logits_36"])
