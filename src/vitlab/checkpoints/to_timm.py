"""vitlab models in timm's layout: the state dict that timm's model of the same architecture loads strictly, and the
``timm.create_model`` arguments that build that model.

Each family's renaming is the exact inverse of its timm converter (``convert_<family>.py``, which reads the file
back into vitlab):

* ViT, DeiT, BEiT-3: timm's names already (identity).
* CaiT, BEiT / BEiT v2: ``blocks.N.ls1.gamma`` -> ``blocks.N.gamma_1`` (CaiT's ``blocks_token_only.N`` too).
* XCiT: ``ls1.gamma`` / ``ls2.gamma`` / ``ls3.gamma`` -> ``gamma1`` / ``gamma2`` / ``gamma3`` (``blocks``,
  ``cls_attn_blocks``).
* Swin v1 / v2, MobileViT v1 / v2: ``head`` -> ``head.fc``.
* CrossViT: ``cls_token.B`` / ``pos_embed.B`` -> ``cls_token_B`` / ``pos_embed_B``; the fusion's ``attn.q`` /
  ``k`` / ``v`` -> ``attn.wq`` / ``wk`` / ``wv``.
* TNT: the fused ``attn_in`` / ``attn_out`` ``qkv`` -> ``qk`` (its first 2/3 rows) and ``v`` (the rest).
* MLP-Mixer: ``patch_embed.proj`` -> ``stem.proj``.

The timm model is the registered name's (a ViT name timm lacks, e.g. ``vit_huge_patch16_224``, maps to one it has,
here ``vit_huge_patch14_224`` with ``patch_size=16``), with the config fields where the model differs from vitlab's
config of that name (timm's defaults for it) as arguments, in timm's spelling. Preprocessing (mean, std, crop,
channel order) and training-only fields (dropout rates) are not model arguments: the file's metadata carries the
preprocessing. A field timm has no argument for (a LayerNorm eps, Swin's ``pad_before_shift``, ...) is refused,
naming it: timm would build another function. timm's MLP-Mixer names fix patch size, depth and width (their
create_model functions pass them before the caller's arguments), so a Mixer that changes those is built with
``timm.models.mlp_mixer.MlpMixer(**kwargs)`` instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from vitlab.checkpoints.families import family_label
from vitlab.checkpoints.io import HUB_WEIGHTS, atomic_write, check_model_folder, write_model_folder
from vitlab.checkpoints.timm_hub import TIMM_ARG_VALUES
from vitlab.checkpoints.vitlab_format import model_metadata, unwrap_model
from vitlab.models.resnet import expansion, resnet_name

log = logging.getLogger(__name__)

FORMAT_NAME = "timm"  # the "format" entry of an exported file's metadata
CREATE_MODEL = "timm.create_model"
MIXER_CLASS = "timm.models.mlp_mixer.MlpMixer"

# families timm has no model for, and what there is instead
_NO_TIMM_MODEL = {
    "t2t": "timm has no T2T-ViT model",
    "cct": "timm has no CCT (Compact Convolutional Transformer) model",
    "detr": "timm has no detection models (DETR)",
    "setr": "timm has no segmentation models (SETR)",
}
_INSTEAD = ("export it to ONNX (vitlab export --format onnx) or keep the vitlab checkpoint, which vitlab.load_model "
            "reads")

# vitlab ViT names that timm does not register -> a timm name of the same width and depth (the patch size and
# resolution then differ: they become create_model arguments)
_TIMM_NAME = {
    "vit_tiny_patch8_224": "vit_tiny_patch16_224", "vit_tiny_patch8_384": "vit_tiny_patch16_384",
    "vit_tiny_patch14_224": "vit_tiny_patch16_224", "vit_tiny_patch32_224": "vit_tiny_patch16_224",
    "vit_tiny_patch32_384": "vit_tiny_patch16_384", "vit_small_patch8_384": "vit_small_patch16_384",
    "vit_small_patch14_224": "vit_small_patch16_224", "vit_base_patch8_384": "vit_base_patch16_384",
    "vit_base_patch14_224": "vit_base_patch16_224", "vit_large_patch8_224": "vit_large_patch16_224",
    "vit_large_patch8_384": "vit_large_patch16_384",
    **{f"vit_huge_patch{p}_{r}": "vit_huge_patch14_224" for p in (8, 16, 32) for r in (224, 384)},
}

# timm names whose create_model function takes no other value for some arguments (crossvit_18_240 passes the
# caller's arguments twice: a TypeError for those it sets itself) -> a name of the same family that does, with them
_FIXED_ARGS = {
    "crossvit_18_240": ("crossvit_15_240", ("img_scale", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")),
}

# config fields that are no timm.create_model argument: preprocessing (timm's pretrained_cfg; in the file's
# metadata), training-only settings (dropout, the head's initial scale) and how vitlab resamples loaded tables
_NOT_MODEL_ARGS = frozenset({
    "mean", "std", "crop_pct", "interpolation", "channel_order", "drop_rate", "pos_drop_rate", "proj_drop_rate",
    "attn_drop_rate", "drop_path_rate", "head_init_scale", "rel_pos_resample",
})


@dataclass(frozen=True)
class TimmModelArgs:
    """How timm builds a vitlab model's architecture.

    ``model_name``: timm's registered name; ``kwargs``: the create_model arguments beyond its defaults (JSON
    values); ``builder``: ``timm.create_model``, or the class to call with ``kwargs`` where create_model cannot
    take them (MLP-Mixer); ``notes``: what a timm user should know (preprocessing, options timm lacks that do
    not change the outputs at the model's input size)."""

    model_name: str
    kwargs: dict[str, Any]
    builder: str = CREATE_MODEL
    notes: tuple[str, ...] = ()

    def build_call(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        if self.builder == CREATE_MODEL:
            return f"timm.create_model({self.model_name!r}, pretrained=False{', ' + args if args else ''})"
        return f"{self.builder}({args})"

    def load_line(self, path: str | Path) -> str:
        """The Python line that builds the model in timm and loads the exported file."""
        return f"{self.build_call()}.load_state_dict(safetensors.torch.load_file({str(path)!r}))"


# ------------------------------------------------------------------------------------------------- names
def _rename(rules: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...]
            ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(sd: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, v in sd.items():
            for pattern, repl in compiled:
                k = pattern.sub(repl, k)
            out[k] = v
        return out

    return rename


_TNT_QKV = re.compile(r"^(blocks\.\d+\.attn_(?:in|out))\.qkv\.(weight|bias)$")


def _split_tnt_qkv(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """vitlab's fused ``qkv`` (q, k, v rows) -> timm's ``qk`` (q, k) and ``v``, as convert_tnt concatenates them."""
    out = {}
    for k, v in sd.items():
        m = _TNT_QKV.match(k)
        if m is None:
            out[k] = v
            continue
        d = v.shape[0] // 3  # (3D, ...) -> (2D, ...) + (D, ...)
        out[f"{m[1]}.qk.{m[2]}"], out[f"{m[1]}.v.{m[2]}"] = v[:2 * d], v[2 * d:]
    return out


_HEAD_FC = (r"^head\.(weight|bias)$", r"head.fc.\1")
_TO_TIMM: dict[str, Callable[[dict[str, Tensor]], dict[str, Tensor]]] = {
    "vit": dict, "deit": dict, "beit3": dict,
    "cait": _rename(((r"^(blocks(?:_token_only)?\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2"),)),
    "beit": _rename(((r"^(blocks\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2"),)),
    "xcit": _rename(((r"^((?:blocks|cls_attn_blocks)\.\d+)\.ls([123])\.gamma$", r"\1.gamma\2"),)),
    "swin": _rename((_HEAD_FC,)), "swinv2": _rename((_HEAD_FC,)), "mobilevit": _rename((_HEAD_FC,)),
    "crossvit": _rename(((r"^(pos_embed|cls_token)\.([01])$", r"\1_\2"),
                         (r"^(blocks\.\d+\.fusion\.\d+\.attn\.)([qkv])\.", r"\1w\2."))),
    "tnt": _split_tnt_qkv,
    "mixer": _rename(((r"^patch_embed\.", "stem."),)),
    "resnet": _rename(((r"^stem\.conv\.", "conv1."), (r"^stem\.norm\.", "bn1."), (r"^head\.", "fc."),
                       (r"^stages\.(\d+)\.blocks\.", lambda m: f"layer{int(m.group(1)) + 1}."),
                       (r"\.norm(\d)\.", r".bn\1."), (r"\.downsample\.conv\.", ".downsample.0."),
                       (r"\.downsample\.norm\.", ".downsample.1."))),
}


# ------------------------------------------------------------------------------------------- arguments
def _json(v: Any) -> Any:
    return [_json(x) for x in v] if isinstance(v, (tuple, list)) else v


class _Args:
    """The config fields where a model differs from the registered config of timm's name, turned one by one into
    create_model arguments; what is left over is refused."""

    def __init__(self, name: str, family: str, timm_name: str, cfg: Any, default: Any, timm_class: str) -> None:
        self.name, self.family, self.timm_name, self.cfg, self.default = name, family, timm_name, cfg, default
        self.timm_class = timm_class
        self.changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if f.name not in _NOT_MODEL_ARGS and _json(getattr(cfg, f.name)) != _json(getattr(default, f.name))}
        self.kwargs: dict[str, Any] = {}
        self.notes: list[str] = []
        self.builder = CREATE_MODEL

    def has(self, *fields: str) -> bool:
        return any(f in self.changed for f in fields)

    def take(self, *fields: str) -> None:
        """Consumed: fixed by the family or name, or handled by the caller."""
        for f in fields:
            self.changed.pop(f, None)

    def same(self, *fields: str) -> None:
        """Fields timm's constructor takes under the same name and meaning."""
        for f in fields:
            if f not in self.changed:
                continue
            value = self.changed.pop(f)
            if value is None:  # timm.create_model drops None arguments: the name's default would stay
                if f == "init_values":
                    value = 0.0  # no LayerScale: timm builds it only for a truthy init_values
                elif f == "fc_norm":
                    value = self.cfg.global_pool in ("avg", "avgmax", "max")  # what None means in vitlab and timm
                else:
                    self.refuse(f, "timm.create_model drops arguments that are None, and the registered name's "
                                   f"default is {getattr(self.default, f)!r}")
            self.kwargs[f] = _json(value)

    def renamed(self, field: str, arg: str, convert: Callable[[Any], Any] = _json) -> None:
        if field in self.changed:
            self.kwargs[arg] = convert(self.changed.pop(field))

    def note_dropped(self, field: str, why: str) -> None:
        if field in self.changed:
            self.notes.append(f"{field}={self.changed.pop(field)!r}: {why}")

    def refuse(self, field: str, why: str) -> None:
        value = getattr(self.cfg, field)
        raise ValueError(f"{self.name} has {field}={value!r}: {why}; timm cannot build this model, so there is no timm "
                         f"layout to export it to")

    def finish(self) -> TimmModelArgs:
        if self.changed:
            parts = [f"{f}={v!r} (the registered {self.timm_name} has {getattr(self.default, f)!r})"
                     for f, v in self.changed.items()]
            raise ValueError(f"{self.name}: {'; '.join(parts)}: timm's {self.timm_class} has no create_model argument "
                             f"for {'this' if len(parts) == 1 else 'these'}, so timm would build another model; "
                             f"there is no timm layout to export it to")
        return TimmModelArgs(self.timm_name, self.kwargs, self.builder, tuple(self.notes))


_NO_DYNAMIC = ("timm's model has no such option: it takes the input size it is built for (other sizes are an error "
               "there), where vitlab's resamples its position table per input")


_POS_ANTIALIAS_NOTE = ("timm resamples the position table antialiased where an input of another size meets it "
                       "(dynamic_img_size), as transformers does not: the same outputs at the model's own size")


# vitlab's gelu -> timm's act_layer: the reading table (timm_hub.TIMM_ARG_VALUES) turned around
_TIMM_ACT = {ours: theirs for (arg, theirs), ours in TIMM_ARG_VALUES.items() if arg == "act_layer"}


def _vit(a: _Args) -> None:
    a.take("attn_type", "linformer_k", "linformer_sharing")  # softmax attention (Linformer refused before)
    a.note_dropped("pos_antialias", _POS_ANTIALIAS_NOTE)
    a.take("distilled", "dist_head")  # DeiT: the timm name says which (_timm_name)
    a.take("drop_remainder")  # timm builds the floored grid of any img_size itself
    if a.has("gelu"):
        a.renamed("gelu", "act_layer", lambda g: _TIMM_ACT[g])
    if a.cfg.pos_embed == "sincos":
        a.refuse("pos_embed", "timm's VisionTransformer has no fixed 2-D sin-cos position table")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
           "mlp_ratio", "qkv_bias", "init_values", "class_token", "pos_embed", "fc_norm", "dynamic_img_size",
           "reg_tokens", "no_embed_class",  # registers; a table for the patch tokens only (DeiT III, DINOv2 reg4)
           "pre_norm")  # CLIP's norm before the blocks (timm drops the patch bias with it, as vitlab)


def _cait(a: _Args) -> None:
    # init_values None: the paper's value for the depth; timm takes the number (its LayerScale is always there)
    if a.cfg.layer_scale != a.default.layer_scale:
        a.kwargs["init_values"] = a.cfg.layer_scale
    a.take("init_values")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
           "mlp_ratio", "qkv_bias", "depth_token_only", "mlp_ratio_token_only")
    a.note_dropped("dynamic_img_size", _NO_DYNAMIC)


def _swin(a: _Args) -> None:
    cfg = a.cfg
    if cfg.pad_before_shift:
        a.refuse("pad_before_shift", "timm pads a map to a multiple of the window after the cyclic shift (Hugging "
                                     "Face's Swin, whose files set it, pads before)")
    a.take("pad_before_shift")
    if a.has("window_size"):
        windows = cfg.windows()
        # one int for every stage, else one (w, w) pair per stage: timm reads a flat pair as one (h, w) window
        a.changed["window_size"] = windows[0] if len(set(windows)) == 1 else [[w, w] for w in windows]
    if cfg.version == 2 and a.has("pretrained_window_sizes"):  # None: each stage's own window, timm's zeros
        a.changed["pretrained_window_sizes"] = cfg.pretrained_window_sizes or (0,) * len(cfg.depths)
        a.same("pretrained_window_sizes")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size",
           "mlp_ratio", "qkv_bias", "dynamic_img_size")


def _norms(cfg: Any) -> tuple[bool, bool]:
    """(fc_norm, final norm) that a BEiT config builds."""
    return cfg.uses_fc_norm, cfg.uses_final_norm


def _beit(a: _Args) -> None:
    cfg = a.cfg
    if cfg.sub_ln:
        a.refuse("sub_ln", "timm's Beit has no LayerNorm inside attention and MLP (BEiT-3's)")
    if cfg.qkv_bias and cfg.qkv_bias_layout != "qv":
        a.refuse("qkv_bias_layout", "timm's Beit has q and v biases only")
    a.take("sub_ln", "qkv_bias_layout")
    a.note_dropped("pos_antialias", _POS_ANTIALIAS_NOTE)
    if a.has("global_pool", "fc_norm", "final_norm"):
        fc_norm, final_norm = _norms(cfg)
        if fc_norm == final_norm:
            a.refuse("final_norm", f"timm's Beit has one final LayerNorm, before pooling or after it (use_fc_norm); "
                                   f"this model has {'both' if fc_norm else 'none'}")
        a.same("global_pool")
        a.kwargs["use_fc_norm"] = fc_norm
        a.take("fc_norm", "final_norm")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "qkv_bias",
           "mlp_ratio", "init_values", "use_abs_pos_emb", "use_rel_pos_bias", "use_shared_rel_pos_bias")
    a.note_dropped("dynamic_img_size", _NO_DYNAMIC)


def _beit3(a: _Args) -> None:
    cfg = a.cfg
    if cfg.use_rel_pos_bias or cfg.use_shared_rel_pos_bias:
        a.refuse("use_rel_pos_bias" if cfg.use_rel_pos_bias else "use_shared_rel_pos_bias",
                 "timm's BEiT-3 (its VisionTransformer) has no relative position tables")
    if cfg.qkv_bias and cfg.qkv_bias_layout != "qkv":
        a.refuse("qkv_bias_layout", "timm's BEiT-3 (its VisionTransformer) has one fused qkv bias")
    a.take("use_rel_pos_bias", "use_shared_rel_pos_bias", "qkv_bias_layout")
    if a.has("global_pool", "fc_norm", "final_norm"):
        # timm's VisionTransformer: a norm before pooling, or after it (fc_norm), or none (final_norm=False)
        fc_norm, final_norm = _norms(cfg)
        if fc_norm and final_norm:
            a.refuse("final_norm", "timm's VisionTransformer normalises before pooling or after it, not both")
        a.same("global_pool")
        a.kwargs["fc_norm"] = fc_norm
        if not (fc_norm or final_norm):
            a.kwargs["final_norm"] = False
        a.take("fc_norm", "final_norm")
    a.renamed("use_abs_pos_emb", "pos_embed", lambda on: "learn" if on else "none")
    if a.has("sub_ln"):
        a.kwargs["scale_attn_norm"] = a.kwargs["scale_mlp_norm"] = cfg.sub_ln
        a.take("sub_ln")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
           "qkv_bias", "init_values", "dynamic_img_size")


def _timm_scale(size: int, target: int) -> float:
    """The scale s for which timm's branch size ``int(size * s)`` is ``target``."""
    s = target / size
    return s if int(size * s) == target else (target + 0.5) / size


def _crossvit(a: _Args) -> None:
    cfg = a.cfg
    # timm feeds branch i the image resized to int(img_size * img_scale[i]), vitlab to p_i * round(img_size * s_i /
    # p_i) (models/crossvit.py): the same at the published sizes; elsewhere the scales that give vitlab's sizes
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    scales = [_timm_scale(h, bh) for bh, _ in cfg.branch_sizes()]
    if any((int(h * s), int(w * s)) != size for s, size in zip(scales, cfg.branch_sizes())):
        a.refuse("img_size", f"timm resizes each branch with one scale for both sides, which gives no "
                             f"{cfg.branch_sizes()} (vitlab's branch sizes) from it")
    if [int(h * s) for s in cfg.branch_scale] != [int(h * s) for s in scales]:
        a.changed["branch_scale"] = scales
    a.renamed("branch_scale", "img_scale")
    # timm: [branch 0 blocks, branch 1 blocks, blocks after the fusion (0: the fusion alone)] per multi-scale block
    a.renamed("depth", "depth", lambda depth: [[int(b0), int(b1), 0] for b0, b1 in depth])
    # timm's drop-path schedule has sum(branch 1 blocks) entries, of which each multi-scale block takes as many as
    # its deeper branch: a branch 0 deeper than branch 1 runs past the end (an IndexError building the model)
    end = sum(b1 for _, b1 in cfg.depth)
    if sum(max(b0, b1) for b0, b1 in cfg.depth) > end:
        a.refuse("depth", "timm's CrossVit cannot build a multi-scale block whose small branch has more blocks than "
                          "its large branch (its drop-path schedule is counted from the large branch)")
    # timm's third ratio is for the blocks after the fusion, which there are none of (its names all say 1)
    a.renamed("mlp_ratio", "mlp_ratio", lambda r: [float(r[0]), float(r[1]), 1.0])
    a.same("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "num_heads", "qkv_bias", "multi_conv",
           "global_pool")


def _tnt(a: _Args) -> None:
    a.same("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "inner_dim", "depth",
           "num_heads_inner", "num_heads_outer", "mlp_ratio", "qkv_bias", "first_stride", "legacy")


def _xcit(a: _Args) -> None:
    a.same("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
           "mlp_ratio", "qkv_bias", "cls_attn_layers", "eta", "tokens_norm")


def _mixer(a: _Args) -> None:
    cfg = a.cfg
    if cfg.gelu != "exact":
        a.refuse("gelu", "timm's MlpMixer uses the exact GELU (nn.GELU) and takes no activation by name")
    a.take("gelu")
    if a.has("tokens_mlp_ratio", "channels_mlp_ratio"):
        a.changed["mlp_ratio"] = [cfg.tokens_mlp_ratio, cfg.channels_mlp_ratio]
        a.take("tokens_mlp_ratio", "channels_mlp_ratio")
    if a.has("patch_size", "depth", "embed_dim"):
        # timm's mixer_* functions pass these before **kwargs: create_model cannot change them; the class can
        a.builder, a.timm_class = MIXER_CLASS, "MlpMixer"
        a.changed.update(patch_size=cfg.patch_size, depth=cfg.depth, embed_dim=cfg.embed_dim, img_size=cfg.img_size,
                         in_chans=cfg.in_chans, num_classes=cfg.num_classes,
                         mlp_ratio=[cfg.tokens_mlp_ratio, cfg.channels_mlp_ratio])
    a.renamed("depth", "num_blocks")
    a.same("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "mlp_ratio")


def _mobilevit(a: _Args) -> None:
    a.take("img_size")  # timm's MobileViT takes any input size; the preprocessing in the metadata has the model's
    if a.cfg.channel_order != "RGB":
        a.notes.append(f"the model reads {a.cfg.channel_order} images (channel_order={a.cfg.channel_order!r}): "
                       f"feed timm's model the same")
    if a.has("patch_remainder"):  # transformers' v2 rule (a Hugging Face folder): timm resizes odd maps instead
        h, w = (a.cfg.img_size, a.cfg.img_size) if isinstance(a.cfg.img_size, int) else a.cfg.img_size
        if h % 64 or w % 64:  # the maps the transformer blocks see (1/8, 1/16, 1/32) are not all multiples of 2
            a.refuse("patch_remainder", f"at {h}x{w} its feature maps have an odd side, whose last row / column "
                                        f"transformers' rule leaves out where timm resizes the map")
        a.note_dropped("patch_remainder", f"the same model at {h}x{w} (every map a multiple of the patch); at sizes "
                                          f"that are not multiples of 64 timm resizes the maps where the Hugging "
                                          f"Face model leaves their last row / column out")
    a.same("num_classes", "in_chans")
    a.timm_class = "MobileViT (a ByobNet built from a fixed block table per name)"


def _resnet(a: _Args) -> None:
    cfg = a.cfg
    for field, why in (("norm", "timm's ResNet uses batch norm"), ("std_conv", "timm's ResNet has plain convolutions"),
                       ("padding", "timm's ResNet pads symmetrically"),
                       ("stem", "timm's ResNet stem is the 7x7 stride-2 convolution and max pool"),
                       ("stride_in_1x1", "timm's ResNet strides on the bottleneck's 3x3 convolution (v1.5)"),
                       ("first_stage_stride", "timm's ResNet does not stride in its first stage")):
        if a.has(field):
            a.refuse(field, why)
    a.take("img_size", "block")  # any input size; the block kind chose the timm name (_timm_name)
    if cfg.stage_channels != a.default.stage_channels:  # timm's widths: the bottleneck's inner one; vitlab's: output
        a.kwargs["channels"] = [c // expansion(cfg.block) for c in cfg.stage_channels]
    a.take("channels")
    if a.has("stem_chs"):
        a.refuse("stem_chs", "timm's ResNet gives its 7x7 stem 64 channels whatever stem_width says (that sets its "
                             "deep stems)")
    a.same("layers", "in_chans", "num_classes")


_ARGS: dict[str, tuple[Callable[[_Args], None], str]] = {
    "vit": (_vit, "VisionTransformer"), "deit": (_vit, "VisionTransformer"), "cait": (_cait, "Cait"),
    "swin": (_swin, "SwinTransformer"), "swinv2": (_swin, "SwinTransformerV2"), "beit": (_beit, "Beit"),
    "beit3": (_beit3, "VisionTransformer"), "crossvit": (_crossvit, "CrossVit"), "tnt": (_tnt, "TNT"),
    "xcit": (_xcit, "Xcit"), "mixer": (_mixer, "MlpMixer"), "mobilevit": (_mobilevit, "MobileViT"),
    "resnet": (_resnet, "ResNet"),
}


def _refuse_family(name: str, family: str, cfg: Any) -> None:
    label = family_label(family)
    if family in _NO_TIMM_MODEL:
        raise ValueError(f"{name} is a {label} model: {_NO_TIMM_MODEL[family]}; {_INSTEAD}")
    if getattr(cfg, "attn_type", "softmax") == "linformer":
        raise ValueError(f"{name} uses Linformer attention (attn_type='linformer'): timm's VisionTransformer has "
                         f"no Linformer; {_INSTEAD}")
    if family == "mobilevit" and cfg.version == "v3":
        raise ValueError(f"{name} is a MobileViT v3 model: timm has MobileViT v1 and v2 only (mobilevit_*, "
                         f"mobilevitv2_*); {_INSTEAD}")
    if family not in _ARGS:
        raise ValueError(f"{name} is a {label} model, which vitlab cannot write in timm's layout; {_INSTEAD}")


def _timm_name(name: str, family: str, cfg: Any) -> str:
    from vitlab.models.registry import get_entry

    timm_name = _TIMM_NAME.get(name, name)
    if family == "resnet" and cfg.block != get_entry(timm_name).config.block:  # timm's block is chosen by name
        timm_name = resnet_name(cfg.block)
    if family == "deit" and cfg.distilled and timm_name.startswith("deit3_"):
        raise ValueError(f"{name} has a distillation token: timm has no distilled DeiT III (deit3_*) model; there is "
                         f"no timm layout to export it to")
    if family == "deit" and cfg.distilled != get_entry(timm_name).config.distilled:
        # timm builds a distillation token by name (deit_*_distilled_patch*)
        timm_name = (timm_name.replace("_patch", "_distilled_patch", 1) if cfg.distilled
                     else timm_name.replace("_distilled_patch", "_patch", 1))
    if family == "deit" and cfg.distilled and not cfg.dist_head:
        raise ValueError(f"{name} has a distillation token without its own head (dist_head=False): timm's "
                         f"distilled DeiT always has head_dist; there is no timm layout to export it to")
    return timm_name


def timm_model_args(model: nn.Module) -> TimmModelArgs:
    """The timm model of ``model``'s architecture: its registered name and the create_model arguments beyond that
    name's defaults. A family timm has no model for, or a config field timm has no argument for, is a ValueError
    naming it."""
    from vitlab.models.registry import get_entry

    model = unwrap_model(model)
    name = getattr(model, "model_name", None)
    cfg = getattr(model, "cfg", None)
    if name is None or cfg is None:
        raise ValueError("to_timm: the model has no registered name; build it with vitlab.create_model")
    family = get_entry(name).family
    _refuse_family(name, family, cfg)
    fill, timm_class = _ARGS[family]

    def args_for(timm_name: str) -> TimmModelArgs:
        args = _Args(name, family, timm_name, cfg, get_entry(timm_name).config, timm_class)
        fill(args)
        return args.finish()

    found = args_for(_timm_name(name, family, cfg))
    other, fixed = _FIXED_ARGS.get(found.model_name, (None, ()))
    if other is not None and set(found.kwargs) & set(fixed):
        found = args_for(other)
    return found


def to_timm_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s weights under the names timm's model of the same architecture has (:func:`timm_model_args`
    builds it); that model loads them strictly. Refused (ValueError) where timm has no such model."""
    model = unwrap_model(model)
    timm_model_args(model)
    family = _family(model)
    return _TO_TIMM[family](model.state_dict())


def _family(model: nn.Module) -> str:
    from vitlab.models.registry import get_entry

    return get_entry(model.model_name).family


def save_timm(model: nn.Module, path: str | Path, *, class_names: list[str] | None = None) -> TimmModelArgs:
    """Write ``model`` as a plain safetensors file in timm's layout (:func:`to_timm_state_dict`), atomically, and
    return how timm builds it. The metadata (strings) holds ``format`` ("timm"), ``timm_model``, ``timm_kwargs``
    (JSON), ``timm_builder`` (where it is not create_model), ``class_names`` (JSON), ``score_function`` (where it
    is not softmax), ``preprocessing`` (JSON: input size, mean, std, crop, channel order) and ``vitlab_model``;
    load it with the line
    :meth:`TimmModelArgs.load_line` gives."""
    from safetensors.torch import save_file

    model = unwrap_model(model)
    args = timm_model_args(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in to_timm_state_dict(model).items()}
    meta = model_metadata(model, class_names=class_names)
    header = {
        "format": FORMAT_NAME,
        "timm_model": args.model_name,
        "timm_kwargs": json.dumps(args.kwargs),
        "preprocessing": json.dumps(_json_safe(meta["preprocessing"])),
        "vitlab_model": meta["model"],
        "vitlab_version": meta["vitlab_version"],
    }
    if args.builder != CREATE_MODEL:
        header["timm_builder"] = args.builder
    if meta["class_names"] is not None:
        header["class_names"] = json.dumps(meta["class_names"], ensure_ascii=False)
    if meta.get("score_function"):  # sigmoid (multi-label) / none (regression); absent: softmax
        header["score_function"] = meta["score_function"]
    for note in args.notes:
        log.info("timm export of %s: %s", meta["model"], note)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=header))
    return args


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _json(v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ hub folder
HUB_CONFIG = "config.json"
# timm models built without a fixed input size (fixed_input_size=False: timm's loader then passes no img_size, which
# their constructors do not take)
_ANY_INPUT_SIZE = frozenset({"mobilevit", "resnet"})


def _timm_module_names(model: nn.Module, family: str, names: list[str]) -> str | list[str]:
    """vitlab module names -> the names of the same modules in timm's layout (one string, or a list as timm)."""
    renamed = [k.removesuffix(".weight") for k in _TO_TIMM[family]({f"{n}.weight": None for n in names})]
    return renamed[0] if len(renamed) == 1 else renamed


def timm_hub_config(model: nn.Module, *, class_names: list[str] | None = None) -> dict[str, Any]:
    """The ``config.json`` of ``model``'s timm hub folder, in the layout timm's ``save_for_hf`` writes:
    ``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``label_names`` (where the model has class
    names), ``model_args`` (:func:`timm_model_args`' arguments) and ``pretrained_cfg`` (the model's preprocessing,
    its input convolution(s) and classifier(s) in timm's names); ``problem_type`` as transformers names the
    model's score function ("multi_label_classification" for sigmoid, "regression" for none). ValueError where timm.create_model cannot build the
    model by name (MLP-Mixer with another patch size, depth or width)."""
    model = unwrap_model(model)
    args = timm_model_args(model)
    if args.builder != CREATE_MODEL:
        raise ValueError(f"{model.model_name}: timm builds this model with {args.builder}(...), not by a registered "
                         f"name, so timm.create_model('local-dir:...') and transformers cannot load a timm folder of "
                         f"it; export a .safetensors file (save_timm) instead")
    family = _family(model)
    meta = model_metadata(model, class_names=class_names)
    pre = model.preprocessing
    in_chans = pre.input_size[0]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == in_chans]
    heads = [f"{h}.{n}" if n else h for h in getattr(model, "classifier_names", (model.classifier_name,))
             for n, m in getattr(model, h).named_modules() if isinstance(m, nn.Linear)]
    heads = heads or list(getattr(model, "classifier_names", (model.classifier_name,)))  # no head (num_classes=0)
    pretrained_cfg = {
        "custom_load": False,  # timm's own state dict (save_for_hf writes this too)
        "input_size": list(pre.input_size),
        "fixed_input_size": family not in _ANY_INPUT_SIZE and not getattr(model.cfg, "dynamic_img_size", False),
        "interpolation": pre.interpolation,
        "crop_pct": pre.crop_pct,
        "crop_mode": pre.crop_mode,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "num_classes": model.num_classes,
        "first_conv": _timm_module_names(model, family, convs),
        "classifier": _timm_module_names(model, family, heads),
    }
    config: dict[str, Any] = {"architecture": args.model_name, "num_classes": model.num_classes,
                              "num_features": model.num_features,
                              "global_pool": getattr(model.cfg, "global_pool", None) or "avg"}
    if meta["class_names"]:
        config["label_names"] = list(meta["class_names"])
    problem = {"sigmoid": "multi_label_classification", "none": "regression"}.get(meta.get("score_function", ""))
    if problem and model.num_classes:  # transformers' pipeline then scores with sigmoid / raw values
        config["problem_type"] = problem
    # num_classes is the top-level entry's (timm applies it): transformers' TimmWrapper passes num_classes itself,
    # and a second one in model_args is a TypeError there
    model_args = {k: v for k, v in args.kwargs.items() if k != "num_classes"}
    if model_args:
        config["model_args"] = model_args
    config["pretrained_cfg"] = pretrained_cfg
    return config


def save_timm_folder(model: nn.Module, folder: str | Path, *, class_names: list[str] | None = None,
                     overwrite: bool = False) -> TimmModelArgs:
    """Write ``model`` as a timm hub folder: ``model.safetensors`` in timm's layout and ``config.json``
    (:func:`timm_hub_config`), which ``timm.create_model("local-dir:FOLDER", pretrained=True)`` and transformers'
    ``AutoModelForImageClassification`` / ``AutoImageProcessor.from_pretrained(FOLDER)`` load.

    Both files are written into a temporary folder beside ``folder``, which is then renamed into place. An existing
    non-empty ``folder`` is refused unless ``overwrite``, which replaces its model.safetensors and config.json
    (each by a rename) and keeps its other files."""

    model = unwrap_model(model)
    folder = Path(folder)
    check_model_folder(folder, overwrite, kind="a timm hub export", names=(HUB_WEIGHTS, HUB_CONFIG))
    config = timm_hub_config(model, class_names=class_names)  # refuses before anything is written
    args = timm_model_args(model)
    sd = {k: v.detach().contiguous().cpu() for k, v in to_timm_state_dict(model).items()}
    for note in args.notes:
        log.info("timm export of %s: %s", model.model_name, note)
    write_model_folder(folder, sd, {HUB_CONFIG: config}, overwrite=overwrite, kind="a timm hub export")
    return args
