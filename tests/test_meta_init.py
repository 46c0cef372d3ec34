"""Building on the meta device: ``to_empty`` + ``load_state_dict`` + ``init_non_persistent_buffers`` gives the
model that was saved (the buffers that state dicts leave out are recomputed, not left uninitialised)."""

from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab.models import get_entry, init_non_persistent_buffers, list_models
from vitlab.ssl.mae import MAEDecoder

from model_helpers import make_tiny, perturb_


def _one_per_family() -> list[str]:
    names: dict[str, str] = {}
    for name in list_models():
        names.setdefault(get_entry(name).family, name)
    return sorted(names.values())


def _first_tensor(out):
    if isinstance(out, dict):
        return out["pred_logits"] if "pred_logits" in out else next(iter(out.values()))
    return out if torch.is_tensor(out) else out[0]


def _meta_copy(build, reference: torch.nn.Module) -> torch.nn.Module:
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    return model


def _same_outputs(reference: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> None:
    reference.eval(), model.eval()
    with torch.no_grad():
        expected, got = _first_tensor(reference(x)), _first_tensor(model(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


CASES = [(name, {}) for name in _one_per_family()] + [
    ("vit_small_patch16_224", {"pos_embed": "sincos", "class_token": False, "global_pool": "avg"}),
    ("cct_7_3x1_32_sine", {}),
    ("swinv2_tiny_window8_256", {"pretrained_window_sizes": (6, 6)}),
    ("swin_tiny_patch4_window7_224", {}),
]


@pytest.mark.parametrize("name,extra", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_meta_built_model_equals_the_saved_one_after_init(name: str, extra: dict) -> None:
    torch.manual_seed(0)
    reference = perturb_(make_tiny(name, **extra))
    model = _meta_copy(lambda: make_tiny(name, **extra), reference)
    done = model.init_non_persistent_buffers()
    size = reference.preprocessing.input_size[-2:]
    _same_outputs(reference, model, torch.randn(2, reference.preprocessing.input_size[0], *size))
    for key, buf in reference.named_buffers():
        torch.testing.assert_close(model.get_buffer(key), buf, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
    # every module holding a buffer that state dicts leave out recomputed it (a new one without a hook would not)
    holders = {name for name, m in model.named_modules()
               if any(m._buffers.get(b) is not None for b in m._non_persistent_buffers_set)}
    assert holders <= set(done), sorted(holders - set(done))


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "beit_base_patch16_224", "swinv2_tiny_window8_256"])
def test_families_with_derived_index_buffers_recompute_them(name: str) -> None:
    """Without the call these models index past their tables (garbage indices); the call must touch them."""
    torch.manual_seed(0)
    reference = make_tiny(name)
    model = _meta_copy(lambda: make_tiny(name), reference)
    for _key, buf in model.named_buffers():
        buf.fill_(-7 if buf.is_floating_point() else 10**6)  # what uninitialised memory may hold
    assert init_non_persistent_buffers(model), "no module recomputed its buffers"
    for key, buf in reference.named_buffers():
        assert torch.equal(model.get_buffer(key), buf), key


def test_detr_with_a_swin_backbone_and_the_mae_decoder() -> None:
    torch.manual_seed(0)
    kw = dict(backbone="swin_tiny_patch4_window7_224",
              backbone_args={"embed_dim": 16, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2), "img_size": 56},
              dim=32, num_heads=4, enc_depth=1, dec_depth=1, ffn_dim=64, num_queries=5, num_classes=3)
    reference = perturb_(vitlab.create_model("detr_resnet50", **kw))
    model = _meta_copy(lambda: vitlab.create_model("detr_resnet50", **kw), reference)
    model.init_non_persistent_buffers()
    _same_outputs(reference, model, torch.randn(1, 3, 56, 56))

    decoder = MAEDecoder(embed_dim=16, patch_dim=12, grid=(3, 4), dim=16, depth=1, num_heads=2)
    meta = _meta_copy(lambda: MAEDecoder(embed_dim=16, patch_dim=12, grid=(3, 4), dim=16, depth=1, num_heads=2),
                      decoder)
    init_non_persistent_buffers(meta)
    assert torch.equal(meta.pos_embed, decoder.pos_embed)
