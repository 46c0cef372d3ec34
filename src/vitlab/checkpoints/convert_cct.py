"""CCT checkpoints -> vitlab: the official SHI-Labs/Compact-Transformers layout, which vit-pytorch's
``vit_pytorch.cct.CCT`` shares key for key.

The released weights are plain state dicts (``src/cct.py`` loads them with ``load_state_dict``); a run of the
official training script (timm's) wraps them in ``state_dict`` / ``state_dict_ema``, which checkpoints/io.py
unwraps. Names:

    tokenizer.conv_layers.I.0.weight             -> tokenizer.layers.I.conv.weight
    classifier.positional_emb                    -> pos_embed (learned); a sinusoid table (stored there as a
                                                    frozen parameter) is recognised and dropped: pos_embed="sine"
    classifier.class_emb                         -> cls_token (seq_pool=False: global_pool="token")
    classifier.attention_pool                    -> attn_pool
    classifier.blocks.J.pre_norm / self_attn.qkv / self_attn.proj / norm1 / linear1 / linear2
                                                 -> blocks.J.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    classifier.norm / classifier.fc              -> norm / head

The file fixes the width, depth, MLP ratio, tokenizer depth / kernel / width, input channels, classes, the
position kind and the pooling; not the heads, the conv stride / padding or the input size (the registered
name's; a learned table of another length is resampled to the model's grid on loading).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from vitlab.checkpoints.convert_timm import head_overrides
from vitlab.checkpoints.converters import Converted, register_converter, register_format_detector
from vitlab.layers import sinusoid_1d_pos_embed

_BLOCK = {"pre_norm": "norm1", "self_attn.qkv": "attn.qkv", "self_attn.proj": "attn.proj", "norm1": "norm2",
          "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^classifier\.blocks\.(\d+)\.(pre_norm|self_attn\.qkv|self_attn\.proj|norm1|linear1|linear2)"
                        r"\.(weight|bias)$")
_CONV_KEY = re.compile(r"^tokenizer\.conv_layers\.(\d+)\.0\.weight$")
_TOP = {"classifier.attention_pool": "attn_pool", "classifier.norm": "norm", "classifier.fc": "head"}


@register_format_detector("cct")
def detect_cct(sd: dict[str, Any]) -> str | None:
    return "official" if any(k.startswith(("classifier.blocks.", "tokenizer.conv_layers.")) for k in sd) else None


def is_sinusoid_table(t: Tensor) -> bool:
    """Whether a (1, N, D) table is the fixed 1-D sinusoid table (the "_sine" variants store it).

    The official table rounds its angles to float32 before the sine (an error up to about N * 6e-8), hence the
    tolerance; a learned table is nowhere near it.
    """
    if t.ndim != 3 or t.shape[0] != 1:
        return False
    ref = sinusoid_1d_pos_embed(t.shape[1], t.shape[2])
    return bool(torch.allclose(t.float(), ref, atol=1e-4, rtol=0))


@register_converter("cct", "official")
def convert_official_cct(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    if "tokenizer.conv_layers.0.0.weight" not in sd or "classifier.norm.weight" not in sd:
        raise KeyError("no tokenizer.conv_layers.0.0 / classifier.norm: this is not a CCT state dict")
    out: dict[str, Tensor] = {}
    over: dict[str, Any] = {}
    for k, v in sd.items():
        if m := _BLOCK_KEY.match(k):
            out[f"blocks.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"] = v
        elif m := _CONV_KEY.match(k):
            out[f"tokenizer.layers.{m[1]}.conv.weight"] = v
        elif k == "classifier.positional_emb":
            if is_sinusoid_table(v):
                over["pos_embed"] = "sine"  # vitlab recomputes it; never trained (requires_grad=False there)
            else:
                out["pos_embed"] = v
        elif k == "classifier.class_emb":
            out["cls_token"] = v
        else:
            prefix, _, leaf = k.rpartition(".")
            if prefix not in _TOP:
                raise KeyError(f"unexpected key {k!r} in a CCT state dict")
            out[f"{_TOP[prefix]}.{leaf}"] = v
    convs = sorted(int(m[1]) for k in sd if (m := _CONV_KEY.match(k)))
    first, last = sd[f"tokenizer.conv_layers.{convs[0]}.0.weight"], sd[f"tokenizer.conv_layers.{convs[-1]}.0.weight"]
    D = int(last.shape[0])
    depth = len({m[1] for k in sd if (m := _BLOCK_KEY.match(k))})
    over.update(embed_dim=D, depth=depth, num_conv_layers=len(convs), kernel_size=int(first.shape[-1]),
                in_chans=int(first.shape[1]), qkv_bias=False)
    if len(convs) > 1:
        over["conv_channels"] = int(first.shape[0])
    if depth:
        over["mlp_ratio"] = sd["classifier.blocks.0.linear1.weight"].shape[0] / D
    over.setdefault("pos_embed", "learn" if "pos_embed" in out else "none")
    over["global_pool"] = "seq" if "attn_pool.weight" in out else "token" if "cls_token" in out else "avg"
    over.update(head_overrides(out))  # no head: a backbone (num_classes=0), not the variant's 1000 classes
    return Converted(out, over)


@register_converter("cct", "timm")
def convert_plain_cct(sd: dict[str, Tensor], meta: dict[str, Any]) -> Converted:
    # timm has no CCT: a plain state dict is vitlab's own names (torch.save(model.state_dict())) or not CCT's
    if "tokenizer.layers.0.conv.weight" not in sd or "norm.weight" not in sd:
        raise KeyError("no tokenizer.layers.0.conv / norm (vitlab) nor tokenizer.conv_layers.0.0 (official) "
                       "weights: this is not a CCT state dict")
    return Converted(dict(sd), head_overrides(sd))  # its classes; none: a backbone
