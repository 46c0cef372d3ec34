"""Checkpoint parity: vitlab loads timm, Hugging Face and JAX (.npz) weights and reproduces the peers' outputs.

The expected outputs in ``tests/fixtures/<case>/io.safetensors`` were computed by timm and transformers
themselves (see ``tests/fixtures/README.md``); this file never imports a peer library. Tolerance: 1e-5
absolute, float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vitlab import create_model, load_model
from vitlab.checkpoints import save_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ATOL = 1e-5
TINY = {"embed_dim": 32, "depth": 2, "num_heads": 4}
# the hybrid fixtures' ResNet: two one-block stages (stride 8), 32 stem channels, bottleneck width 32
TINY_HYBRID = dict(TINY, hybrid_layers=(1, 1), hybrid_channels=(128, 128), hybrid_stem_chs=32)

# case -> (registered name, weights file inside the case folder, overrides on top of the registered config)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "timm_token_p16": ("vit_base_patch16_224", "model.safetensors", dict(TINY, img_size=64)),
    "timm_gap_p14": ("vit_base_patch14_224", "model.safetensors", dict(TINY, img_size=56)),
    "timm_p32_pth": ("vit_base_patch32_224", "model.pth", dict(TINY, img_size=64)),
    "timm_hybrid": ("vit_base_r50_s16_224", "model.safetensors", dict(TINY_HYBRID, img_size=32)),
    "jax_token_p16": ("vit_base_patch16_224", "model.npz", dict(TINY, img_size=48)),
    "jax_gap_p16": ("vit_base_patch16_224", "model.npz", dict(TINY, img_size=48)),
    "jax_prelogits_p16": ("vit_base_patch16_224", "model.npz", dict(TINY, img_size=48)),
    "jax_hybrid": ("vit_base_r50_s16_224", "model.npz", dict(TINY_HYBRID, img_size=32)),
}


def io(case: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / case / "io.safetensors"))


def expected(case: str) -> dict[str, torch.Tensor]:
    """The peer's outputs; a JAX case's model runs tanh GELU as the original JAX code (flax.linen.gelu): its outputs
    are timm's with act_layer='gelu_tanh' (official_more_jax_tanh.safetensors, make_fixtures_official_more.py), not
    the exact-GELU ones in its io.safetensors."""
    ref = io(case)
    if case.startswith("jax_"):
        tanh = load_file(str(FIXTURES / "official_more_jax_tanh.safetensors"))
        ref.update({k.split("/", 1)[1]: v for k, v in tanh.items() if k.startswith(f"{case}/")})
    return ref


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{what}: max abs difference {err:.3g} > {ATOL}"


def load_case(case: str, **extra: Any) -> torch.nn.Module:
    name, weights, overrides = CASES[case]
    return create_model(name, pretrained=FIXTURES / case / weights, **{**overrides, **extra}).eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_peer(case: str) -> None:
    model = load_case(case)
    ref = expected(case)
    with torch.no_grad():
        feats = model.forward_features(ref["input"])
        assert_close(feats, ref["features"], f"{case} forward_features")
        assert_close(model.forward_head(feats, pre_logits=True), ref["pre_logits"], f"{case} pre-logits")
        assert_close(model(ref["input"]), ref["logits"], f"{case} logits")


def test_fixture_outputs_are_informative() -> None:
    """Guards the fixtures themselves: logits that barely depend on the input would test little."""
    for case in [*CASES, "hf_vit_cls_bin"]:
        logits = expected(case)["logits"]
        assert logits.std() > 0.3, case
        assert (logits[0] - logits[1]).abs().max() > 0.1, f"{case}: both samples give the same logits"


def test_pooling_and_tokens_read_from_the_files() -> None:
    """The converters set the pooling the checkpoint was trained with; the test passes only sizes."""
    gap = load_case("timm_gap_p14")  # timm global_pool='avg': class token kept, norm after pooling
    assert gap.global_pool == "avg" and gap.cls_token is not None
    assert isinstance(gap.norm, torch.nn.Identity) and not isinstance(gap.fc_norm, torch.nn.Identity)
    jgap = load_case("jax_gap_p16")  # JAX 'gap' classifier: no class token, norm before pooling
    assert jgap.global_pool == "avg" and jgap.cls_token is None
    assert isinstance(jgap.fc_norm, torch.nn.Identity) and not isinstance(jgap.norm, torch.nn.Identity)
    assert load_case("timm_token_p16").global_pool == "token"
    assert load_case("jax_prelogits_p16").cfg.representation_size == 24  # the npz's pre_logits layer


@pytest.mark.parametrize("size", [96, 48])
def test_loading_at_another_resolution_matches_timm(size: int) -> None:
    """timm's create_model(img_size=...) path (checkpoint_filter_fn: bicubic, antialiased) vs vitlab's."""
    ref = io("timm_resample")
    model = load_case("timm_token_p16", img_size=size)
    assert model.patch_embed.grid_size == (size // 16, size // 16)
    assert_close(model.pos_embed.detach(), ref[f"pos_embed_{size}"], f"pos_embed at {size}px")
    with torch.no_grad():
        assert_close(model(ref[f"input_{size}"]), ref[f"logits_{size}"], f"logits at {size}px")


def test_hf_vit_model_pooler_equals_pre_logits() -> None:
    """HF ViTModel's pooler (dense + tanh on the class token) is vitlab's representation layer."""
    ref = io("hf_vit_pooler")
    model = create_model("vit_base_patch16_224", pretrained=FIXTURES / "hf_vit_pooler" / "hf").eval()
    assert model.cfg.embed_dim == 32 and model.cfg.depth == 2 and model.cfg.img_size == 48  # from config.json
    assert model.cfg.representation_size == 24 and model.num_classes == 0
    assert model.cfg.norm_eps == 1e-12  # HF's layer_norm_eps, not vitlab's 1e-6
    with torch.no_grad():
        feats = model.forward_features(ref["input"])
        assert_close(feats, ref["features"], "last_hidden_state")
        assert_close(model.forward_head(feats, pre_logits=True), ref["pooler_output"], "pooler_output")


def test_hf_vit_for_image_classification_from_bin() -> None:
    ref = io("hf_vit_cls_bin")
    folder = FIXTURES / "hf_vit_cls_bin" / "hf"
    assert (folder / "pytorch_model.bin").exists() and not (folder / "model.safetensors").exists()
    for model in (create_model("vit_base_patch16_224", pretrained=folder), load_model(folder)):
        model.eval()
        assert model.num_classes == 4 and model.cfg.representation_size is None
        with torch.no_grad():
            assert_close(model.forward_features(ref["input"]), ref["features"], "last_hidden_state")
            assert_close(model(ref["input"]), ref["logits"], "logits")


def test_load_model_reads_hf_folder_with_safetensors() -> None:
    ref = io("hf_vit_pooler")
    model = load_model(FIXTURES / "hf_vit_pooler" / "hf").eval()
    with torch.no_grad():
        assert_close(model.forward_head(model.forward_features(ref["input"]), pre_logits=True),
                     ref["pooler_output"], "pooler_output via load_model")


@pytest.mark.parametrize("case", ["timm_hybrid", "jax_gap_p16"])
def test_vitlab_round_trip_keeps_outputs_names_and_preprocessing(case: str, tmp_path: Path) -> None:
    model = load_case(case, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    names = [f"class_{i}" for i in range(model.num_classes)]
    path = save_model(model, tmp_path / "ck.safetensors", class_names=names)
    again = load_model(path).eval()
    x = io(case)["input"]
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.class_names == names
    assert again.preprocessing == model.preprocessing
    assert again.preprocessing.mean == (0.485, 0.456, 0.406)
    assert again.cfg == model.cfg
    assert again.model_name == CASES[case][0]

