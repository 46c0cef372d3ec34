"""Which architecture family a checkpoint looks like, read off the names of its tensors.

Used only to explain a failed load: a Swin file given to a ViT model fails with a list of missing keys, a ViT
file given to CaiT with a position table that does not fit. When the file plainly belongs to another family, the
error names that family and the one asked for instead (README: "a checkpoint of another family is refused with a
message naming both"). A successful load is never second-guessed: some families read others' files (DeiT reads
ViT's).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

# what each family is called in messages
FAMILY_NAMES = {
    "vit": "ViT", "deit": "DeiT", "cait": "CaiT", "swin": "Swin", "swinv2": "Swin v2", "beit": "BEiT",
    "beit3": "BEiT-3", "crossvit": "CrossViT", "tnt": "TNT", "xcit": "XCiT", "mixer": "MLP-Mixer",
    "mobilevit": "MobileViT", "cct": "CCT", "t2t": "T2T-ViT", "resnet": "ResNet", "detr": "DETR", "setr": "SETR",
}
# families whose models load files of another family: DeiT without distillation is ViT; SETR and DETR are built
# around ViT / ResNet backbones. A failure there is about the file's size or options, not its family.
READS_FILES_OF = {"deit": {"vit"}, "setr": {"vit"}, "detr": {"vit", "resnet"}}
# how the dense models take a classifier file as their backbone (not through create_model's pretrained=)
_BACKBONE_FILES = {"setr": "a ViT / DeiT checkpoint as its encoder",
                   "detr": "a ResNet / ViT checkpoint as its backbone"}
# the first key component of Hugging Face models (``swin.encoder...``), per family
_HF_PREFIXES = {
    "vit": "vit", "deit": "deit", "beit": "beit", "data2vec_vision": "beit", "swin": "swin", "swinv2": "swinv2",
    "mobilevit": "mobilevit", "mobilevitv2": "mobilevit",
}
_SWIN_BLOCK = re.compile(r"(^|\.)layers\.\d+\.blocks\.\d+\.")
_VIT_BLOCK = re.compile(r"^blocks\.\d+\.attn\.qkv\.weight$")


@dataclass(frozen=True)
class LooksLike:
    family: str
    evidence: str  # the tensors that give it away, in words

    @property
    def label(self) -> str:
        return family_label(self.family)


def family_label(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _any(keys: list[str], *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def _starts(keys: list[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _vit_evidence(sd: Mapping[str, Any], keys: list[str]) -> str:
    parts = []
    pos = sd.get("pos_embed")
    if "cls_token" in sd:
        n = int(pos.shape[1]) if getattr(pos, "ndim", 0) == 3 else None
        if n is not None and math.isqrt(n - 1) ** 2 == n - 1:
            parts.append("a class token with its entry in the position table")
        elif n is not None and math.isqrt(n) ** 2 == n:
            parts.append("a class token without an entry in the position table")
        else:
            parts.append("a class token")
    parts.append("'blocks.N' transformer blocks and no class-attention blocks")
    return ", ".join(parts)


# (family, test on the keys, evidence): the first that matches wins, so the more specific layouts come first
# (CaiT, XCiT, T2T-ViT, BEiT all have ViT-like 'blocks.N' too)
_SIGNATURES: tuple[tuple[str, Callable[[list[str]], bool], str], ...] = (
    ("swinv2", lambda ks: any(_SWIN_BLOCK.search(k) for k in ks)
     and _any(ks, ".cpb_mlp.", ".continuous_position_bias_mlp.", "logit_scale"),
     "windowed stages 'layers.N.blocks.M' with a continuous position bias 'cpb_mlp'"),
    ("swin", lambda ks: any(_SWIN_BLOCK.search(k) for k in ks),
     "windowed stages 'layers.N.blocks.M' with relative position bias tables"),
    ("cait", lambda ks: _starts(ks, "blocks_token_only."), "class-attention blocks 'blocks_token_only.N'"),
    ("xcit", lambda ks: _any(ks, ".attn.temperature") or _starts(ks, "cls_attn_blocks.", "pos_embeder."),
     "cross-covariance attention 'blocks.N.attn.temperature' and class-attention blocks 'cls_attn_blocks.N'"),
    ("crossvit", lambda ks: _starts(ks, "pos_embed_0", "pos_embed.0", "cls_token_0", "cls_token.0"),
     "two branches with their own tables, 'pos_embed_0' / 'pos_embed_1'"),
    ("tnt", lambda ks: _starts(ks, "patch_pos", "pixel_pos", "outer_pos", "inner_pos", "pixel_embed."),
     "inner (pixel) and outer (patch) transformers, 'pixel_pos' / 'patch_pos'"),
    ("t2t", lambda ks: _starts(ks, "tokens_to_token."), "a tokens-to-token stem 'tokens_to_token.'"),
    ("cct", lambda ks: _starts(ks, "tokenizer.", "classifier.blocks.", "classifier.attention_pool."),
     "a convolutional tokenizer 'tokenizer.' and sequence pooling"),
    ("mixer", lambda ks: _any(ks, ".mlp_tokens.", "MixerBlock_"),
     "token-mixing MLPs 'blocks.N.mlp_tokens', no attention"),
    ("mobilevit", lambda ks: _any(ks, ".conv_kxk.", ".conv1_1x1.") or _starts(ks, "conv_1.block.", "layer_1."),
     "convolution stages with MobileViT blocks ('conv_kxk', 'conv1_1x1', 'transformer')"),
    ("detr", lambda ks: _starts(ks, "transformer.decoder.", "query_embed.", "class_embed.", "model.decoder."),
     "an encoder-decoder transformer with object queries ('query_embed', 'class_embed')"),
    ("beit3", lambda ks: _starts(ks, "beit3.") or (_any(ks, ".attn.norm.") and _any(ks, ".mlp.norm.")),
     "a norm inside attention and inside the MLP ('blocks.N.attn.norm', 'blocks.N.mlp.norm')"),
    ("beit", lambda ks: _starts(ks, "rel_pos_bias.") or (_any(ks, ".attn.q_bias") and _starts(ks, "blocks."))
     or _any(ks, "blocks.0.attn.relative_position_bias_table"),
     "relative position bias tables 'blocks.N.attn.relative_position_bias_table' and q / v biases"),
    ("resnet", lambda ks: _starts(ks, "stages.0.blocks.0.conv1.", "layer1.0.conv1."),
     "convolution stages of residual blocks ('stages.N.blocks.M.conv1' / 'layer1.0.conv1'), no attention"),
    ("deit", lambda ks: "dist_token" in ks, "a distillation token 'dist_token'"),
)


def looks_like(sd: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> LooksLike | None:
    """The family ``sd`` (a state dict as read, in its own layout) plainly belongs to; None when unsure.

    ``config``: a Hugging Face ``config.json``, whose ``model_type`` names the family outright.
    """
    model_type = (config or {}).get("model_type")
    if isinstance(model_type, str):
        family = _hf_model_type_family(model_type)
        if family is not None:
            return LooksLike(family, f"its config.json has model_type {model_type!r}")
    keys = [k for k in sd if isinstance(k, str)]
    first = {k.split(".")[0] for k in keys}
    for prefix, family in _HF_PREFIXES.items():
        if prefix in first and _any(keys, ".embeddings.", ".encoder."):
            return LooksLike(family, f"Hugging Face {family_label(family)} names '{prefix}.embeddings' / "
                                     f"'{prefix}.encoder'")
    for family, test, evidence in _SIGNATURES:
        if test(keys):
            return LooksLike(family, evidence)
    if any(_VIT_BLOCK.match(k) for k in keys) or _starts(keys, "Transformer/encoderblock_"):
        return LooksLike("vit", _vit_evidence(sd, keys))
    return None


def _hf_model_type_family(model_type: str) -> str | None:
    from vitlab.checkpoints.converters import hf_model_types
    from vitlab.models.registry import get_entry

    default = hf_model_types().get(model_type)
    return get_entry(default).family if default is not None else None


def backbone_route(family: str) -> str | None:
    """How a dense model (SETR, DETR) loads a classifier checkpoint into its backbone; None for other families."""
    what = _BACKBONE_FILES.get(family)
    if what is None:
        return None
    return (f"a {family_label(family)} model takes {what} through load_backbone, not pretrained=: build it (the "
            f"backbone's name and sizes in backbone= / backbone_args=), then "
            f"vitlab.models.dense.load_backbone(model, PATH); on the command line, vitlab train --task "
            f"{'segmentation' if family == 'setr' else 'detection'} --pretrained-backbone PATH")


def other_family_message(path: Any, found: LooksLike | None, family: str, name: str | None = None) -> str | None:
    """The error for a file of another family than ``family`` (that of the registered ``name``), or None when the
    file is not plainly another family's (or one that ``family`` reads)."""
    if found is None or found.family == family or found.family in READS_FILES_OF.get(family, ()):
        return None
    from vitlab.models.registry import list_models

    asked = f"the {family_label(family)} family" + (f" that {name} belongs to" if name else "")
    article = "an" if found.label.startswith(("MLP", "XCiT")) else "a"
    examples = list_models(family=found.family, task=None)
    hint = f"; load it with {article} {found.label} model (e.g. {examples[0]})" if examples else ""
    label = "ViT/DeiT" if found.family == "vit" else found.label
    return f"{path}: looks like {article} {label} checkpoint ({found.evidence}), not one of {asked}{hint}"
