"""DETR: End-to-End Object Detection with Transformers (Carion et al., 2020, arXiv:2005.12872).

What differs from a ViT classifier:

* A backbone gives one feature map: ResNet-50 (vitlab's, batch norm frozen, stem and first stage not
  trained, its own smaller learning rate) or any vitlab backbone through ``forward_intermediates``
  (ViT, DeiT, Swin: the last block's map). A 1x1 convolution projects it to the transformer width.
* Padding masks are carried through: images of a batch are padded to a common size, the mask (True on
  real pixels) is resized to the feature map, padded cells are never attended and do not shift the
  2-D sine position encodings.
* A post-norm encoder-decoder transformer (6 + 6 layers, width 256, 8 heads, FFN 2048, ReLU, dropout
  0.1). Position encodings are added to queries and keys - never values - in every attention layer:
  sine encodings of the pixels in encoder self-attention and on the decoder's cross-attention keys,
  the learned object queries (``query_embed``) on the decoder's self-attention queries/keys and its
  cross-attention queries. The decoder input is zeros.
* Heads on every decoder layer (after the shared final LayerNorm): a linear classifier over the
  classes plus "no object" (the last logit) and a 3-layer MLP with a sigmoid giving normalised
  (cx, cy, w, h) boxes. Earlier layers' predictions feed the auxiliary losses.

``forward(x, pixel_mask=None)`` returns a dict: ``logits`` (B, Q, C+1), ``boxes`` (B, Q, 4) and, when
``aux_loss``, ``aux_logits`` / ``aux_boxes`` (layers-1, B, Q, ...). The set loss and matcher live in
:mod:`vitlab.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.layers import CrossAttention, Mlp, call_block, freeze_batch_norm, sine_position_2d
from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, TimmSurface, record_head
from vitlab.models.dense import drop_attention_pool
from vitlab.models.registry import ModelEntry, check_config, register_model


@dataclass(frozen=True, kw_only=True)
class DETRConfig:
    """Args:
    backbone: a registered vitlab name (``resnet50``, ``vit_small_patch16_224``, ...).
    backbone_args: config overrides for the backbone (e.g. a tiny ResNet's ``layers`` / ``channels``,
        a ViT's ``img_size`` / ``dynamic_img_size``).
    backbone_lr_scale: the backbone's learning rate relative to the transformer's (1e-5 / 1e-4).
    freeze_stem: freeze the ResNet stem and first stage (DETR) and turn its batch norms into frozen ones.
    num_classes: object classes, without "no object" (COCO: 91 = largest category id + 1).
    num_queries: object queries (100 for COCO).
    img_size: the nominal input size (preprocessing; any size runs): the shorter side of the resize (an
        (H, W) pair with a ``crop_mode="squash"`` preprocessing style: both sides, aspect not kept).
    max_size: cap on the longer side of the resize (None: 5/3 of ``img_size``, DETR's 800 / 1333; Hugging
        Face's ``longest_edge``).
    num_heads: attention heads of the encoder (and of the decoder unless ``dec_num_heads`` is given).
    dec_num_heads: attention heads of the decoder's self- and cross-attention (None: ``num_heads``; Hugging
        Face's ``decoder_attention_heads``).
    dec_norm_between_layers: feed each decoder layer the final LayerNorm of the previous layer's output, and
        normalise the last output twice, as transformers' ``DetrDecoder`` does when its config has
        ``auxiliary_loss: true`` (set when such a folder loads; training and the auxiliary losses then use
        this form too). False: the paper's decoder (the norm only before the heads).
    """

    backbone: str = "resnet50"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    backbone_lr_scale: float = 0.1
    freeze_stem: bool = True
    num_classes: int = 91
    num_queries: int = 100
    dim: int = 256
    num_heads: int = 8
    dec_num_heads: int | None = None
    dec_norm_between_layers: bool = False
    enc_depth: int = 6
    dec_depth: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1
    aux_loss: bool = True
    img_size: int | tuple[int, int] = 800
    max_size: int | None = None
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_config(self)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(x + pos, x + pos, x)); x = norm2(x + ffn(x))."""

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.attn = CrossAttention(cfg.dim, num_heads=cfg.num_heads, attn_drop=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, hidden_features=cfg.ffn_dim, act_layer=nn.ReLU, drop=cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)

    def forward(self, x: Tensor, pos: Tensor, key_mask: Tensor | None) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop(self.attn(qk, qk, x, key_mask)))
        return self.norm2(x + self.mlp(x))


class DecoderLayer(nn.Module):
    """Post-norm self-attention among the queries, cross-attention to the image, FFN."""

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        heads = cfg.num_heads if cfg.dec_num_heads is None else cfg.dec_num_heads
        self.self_attn = CrossAttention(cfg.dim, num_heads=heads, attn_drop=cfg.dropout)
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.cross_attn = CrossAttention(cfg.dim, num_heads=heads, attn_drop=cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = Mlp(cfg.dim, hidden_features=cfg.ffn_dim, act_layer=nn.ReLU, drop=cfg.dropout)
        self.norm3 = nn.LayerNorm(cfg.dim)
        self.drop1 = nn.Dropout(cfg.dropout)
        self.drop2 = nn.Dropout(cfg.dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, key_mask: Tensor | None) -> Tensor:
        qk = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(qk, qk, tgt)))
        tgt = self.norm2(tgt + self.drop2(self.cross_attn(tgt + query_pos, memory + pos, memory, key_mask)))
        return self.norm3(tgt + self.mlp(tgt))


class Encoder(nn.Module):
    grad_checkpointing = False  # set by the model's set_grad_checkpointing
    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_depth))

    def forward(self, x: Tensor, pos: Tensor, key_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            x = call_block(layer, x, pos, key_mask, checkpointed=self.grad_checkpointing)
        return x


class Decoder(nn.Module):
    grad_checkpointing = False  # set by the model's set_grad_checkpointing
    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.norm_between_layers = cfg.dec_norm_between_layers

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor,
                key_mask: Tensor | None) -> list[Tensor]:
        """Every layer's output through the shared final norm (the last is the prediction); with
        ``norm_between_layers`` the normalised output is also the next layer's input and the last is
        normalised once more (transformers' ``auxiliary_loss`` decoder)."""
        outs = []
        for layer in self.layers:
            tgt = call_block(layer, tgt, query_pos, memory, pos, key_mask, checkpointed=self.grad_checkpointing)
            if self.norm_between_layers:
                tgt = self.norm(tgt)
                outs.append(tgt)
            else:
                outs.append(self.norm(tgt))
        if self.norm_between_layers and outs:
            outs[-1] = self.norm(outs[-1])
        return outs


class BoxHead(nn.Module):
    """The 3-layer MLP (ReLU between) predicting normalised (cx, cy, w, h) through a sigmoid."""

    def __init__(self, dim: int, num_layers: int = 3) -> None:
        super().__init__()
        dims = [dim] * num_layers + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x.sigmoid()


def build_backbone(cfg: DETRConfig) -> nn.Module:
    """A headless vitlab backbone; a ResNet gets frozen batch norm and a frozen stem and first stage."""
    from vitlab.models.factory import create_model
    from vitlab.models.registry import get_entry

    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.backbone_args.items()}
    args.setdefault("in_chans", cfg.in_chans)
    net = create_model(cfg.backbone, num_classes=0, **args)
    drop_attention_pool(net)
    if get_entry(cfg.backbone).family == "resnet" and cfg.freeze_stem:
        freeze_batch_norm(net)
        for m in (net.stem, net.stages[0]):
            m.requires_grad_(False)
    return net


class DETR(TimmSurface, nn.Module):
    """DETR on a vitlab backbone: ``forward(images, pixel_mask=None) -> {"logits", "boxes", ...}``."""

    num_prefix_tokens = 0
    classifier_names = ("class_embed",)
    classifier_name = "class_embed"
    task = "detection"
    explain_default = "last-layer"  # the paper's figure: an object's decoder cross-attention

    def __init__(self, cfg: DETRConfig) -> None:
        super().__init__()
        if cfg.dim % 4 != 0:
            raise ValueError(f"DETRConfig: dim={cfg.dim} must be divisible by 4 (the 2-D sine encoding)")
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.input_proj = nn.Conv2d(self.backbone.num_features, cfg.dim, kernel_size=1)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.dim)
        self.class_embed = nn.Linear(cfg.dim, cfg.num_classes + 1)
        self.bbox_embed = BoxHead(cfg.dim)
        self.num_features = cfg.dim
        self._init_weights()

    def _init_weights(self) -> None:
        # xavier-uniform on the transformer's matrices, as in the reference; backbone and heads keep theirs
        for module in (self.encoder, self.decoder):
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        nn.init.normal_(self.query_embed.weight)

    # ------------------------------------------------------------------------- common surface
    @property
    def num_classes(self) -> int:
        return self.class_embed.out_features - 1

    @property
    def preprocessing(self) -> Preprocessing:
        size = self.cfg.img_size if isinstance(self.cfg.img_size, tuple) else (self.cfg.img_size,) * 2
        return Preprocessing(input_size=(self.cfg.in_chans, *size), mean=self.cfg.mean, std=self.cfg.std,
                             crop_pct=1.0, interpolation="bilinear")

    @property
    def max_size(self) -> int:
        """The cap on the longer side of the resize (``cfg.max_size``, else 5/3 of the shorter side)."""
        if self.cfg.max_size is not None:
            return int(self.cfg.max_size)
        size = self.cfg.img_size
        return int((size if isinstance(size, int) else min(size)) * 5 / 3)

    def set_resize(self, img_size: int | tuple[int, int], max_size: int | None = None) -> None:
        """Resize images to ``img_size`` (the shorter side, the longer at most ``max_size``; an (H, W) pair for a
        squash); kept in the config, so vitlab checkpoints record it. Only preprocessing uses these sizes."""
        self.cfg = replace(self.cfg, img_size=img_size, max_size=max_size)

    def no_weight_decay(self) -> set[str]:
        return set()

    def reset_classifier(self, num_classes: int) -> None:
        """A zero-initialised class head for ``num_classes`` objects (+ no object)."""
        self.class_embed = nn.Linear(self.cfg.dim, num_classes + 1)
        nn.init.zeros_(self.class_embed.weight)
        nn.init.zeros_(self.class_embed.bias)
        record_head(self, num_classes=num_classes)

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (the backbone trains 10x slower)."""
        return {"backbone.": self.cfg.backbone_lr_scale}

    @property
    def onnx_fixed_size_reason(self) -> str | None:
        """Why a dynamic-size ONNX export is refused (None: it is supported)."""
        from vitlab.models.dense import backbone_fixed_size_reason

        return backbone_fixed_size_reason(self)

    @property
    def input_size_multiple(self) -> int:
        """The step between input sizes that export checks: a plain ViT's patch, else 32 (the output stride
        of a ResNet or a Swin)."""
        pe = getattr(self.backbone, "patch_embed", None)
        return max(pe.patch_size) if hasattr(self.backbone, "blocks") and pe is not None else 32

    # ------------------------------------------------------------------------- forward
    def forward_backbone(self, x: Tensor, pixel_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The projected feature map (B, dim, h, w) and its mask (B, h, w), True on real cells.

        A convolutional backbone (ResNet) runs on the padded batch. A token backbone that takes any size (a ViT
        with ``dynamic_img_size``) runs on each group of images of one real size at that size (padded only to
        its patch multiple, as the image alone is), so that padded patches are never attended and its position
        table is resampled to the image's own grid: an image's features do not depend on the other images of
        its batch. A fixed-size token backbone runs on the padded batch (the one size it takes)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_chans:
            raise ValueError(f"DETR: expected images (batch, {self.cfg.in_chans}, H, W), got {tuple(x.shape)}")
        if pixel_mask is not None and pixel_mask.shape != (x.shape[0], *x.shape[-2:]):
            raise ValueError(f"DETR: pixel_mask must be (batch, H, W) = {(x.shape[0], *x.shape[-2:])}, "
                             f"got {tuple(pixel_mask.shape)}")
        x, pixel_mask = self.pad_to_patches(x, pixel_mask)
        if hasattr(self.backbone, "stages") and hasattr(self.backbone, "stem"):
            feat = self.backbone.forward_features(x)
        else:
            feat = self._token_features_by_size(x, pixel_mask)
        if pixel_mask is None:
            mask = torch.ones(feat.shape[0], *feat.shape[-2:], dtype=torch.bool, device=feat.device)
        else:
            mask = F.interpolate(pixel_mask[None].float(), size=feat.shape[-2:]).to(torch.bool)[0]
        return self.input_proj(feat), mask

    def _token_features(self, x: Tensor) -> Tensor:
        _, inter = self.backbone.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW")
        return inter[-1]  # (B, C, H / patch, W / patch)

    def _token_features_by_size(self, x: Tensor, pixel_mask: Tensor | None) -> Tensor:
        """A token backbone's map of the padded batch ``x``, each image computed at its real size (the extent of
        its ``pixel_mask``, zero-padded to the patch multiple) and placed at the top left; zeros elsewhere."""
        patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
        plain = hasattr(self.backbone, "blocks") and patch is not None  # a map of stride patch (not Swin's)
        # an exported graph takes no mask (every pixel real): the grouping, which reads the mask, is not traced
        exporting = (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                     or getattr(torch.compiler, "is_exporting", lambda: False)())
        if pixel_mask is None or not plain or not getattr(self.backbone, "dynamic_img_size", False) or exporting:
            return self._token_features(x)
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        B, _, H, W = x.shape
        # each image's real extent (pad_batch pads at the bottom / right); no real pixel: the whole input
        rows = (pixel_mask.any(2) * torch.arange(1, H + 1, device=x.device)).amax(1)  # (B,)
        cols = (pixel_mask.any(1) * torch.arange(1, W + 1, device=x.device)).amax(1)
        sizes = [(h or H, w or W) for h, w in zip(rows.tolist(), cols.tolist())]
        if set(sizes) == {(H, W)}:
            return self._token_features(x)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        gh, gw = H // ph, W // pw  # the padded batch's grid (pad_to_patches made H, W patch multiples)
        maps, order = [], []
        for (h, w), idx in groups.items():
            crop = x[idx, :, :h, :w]  # the real pixels only, zero-padded to the patch multiple as when alone
            crop = F.pad(crop, (0, -w % pw, 0, -h % ph))
            f = self._token_features(crop)  # (n, C, ceil(h / ph), ceil(w / pw))
            if tuple(f.shape[-2:]) != (crop.shape[-2] // ph, crop.shape[-1] // pw):
                return self._token_features(x)  # a backbone whose stride is not its patch (Swin): as before
            maps.append(F.pad(f, (0, gw - f.shape[-1], 0, gh - f.shape[-2])))
            order.extend(idx)
        inverse = torch.empty(B, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(B)
        return torch.cat(maps)[inverse.to(x.device)]  # (B, C, gh, gw), the batch's order

    def pad_to_patches(self, x: Tensor, pixel_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """A patch-embedding backbone (ViT) needs sides that are multiples of its patch: pad the images at the
        bottom / right with zeros and mark the padding in the pixel mask (made here if there was none), as
        DETR's batch padding does; images that fit, and convolutional backbones, pass unchanged."""
        patch = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
        if patch is None:
            return x, pixel_mask
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        H, W = x.shape[-2:]
        pad_h, pad_w = -H % ph, -W % pw
        if isinstance(pad_h, int) and isinstance(pad_w, int) and pad_h == pad_w == 0:
            return x, pixel_mask
        if pixel_mask is None:
            pixel_mask = torch.ones(x.shape[0], H, W, dtype=torch.bool, device=x.device)
        return F.pad(x, (0, pad_w, 0, pad_h)), F.pad(pixel_mask, (0, pad_w, 0, pad_h), value=False)

    def forward_features(self, x: Tensor, pixel_mask: Tensor | None = None) -> list[Tensor]:
        """Every decoder layer's normalised query embeddings (B, Q, dim); the last is the final one."""
        x, pixel_mask = self.pad_to_patches(x, pixel_mask)
        feat, mask = self.forward_backbone(x, pixel_mask)
        B = feat.shape[0]
        pos = sine_position_2d(mask, self.cfg.dim, dtype=feat.dtype).flatten(2).transpose(1, 2)
        src = feat.flatten(2).transpose(1, 2)  # (B, h*w, dim)
        key_mask = None if pixel_mask is None else mask.flatten(1)  # no padding: the unmasked fast path
        memory = self.encoder(src, pos, key_mask)
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        self._feature_size = tuple(feat.shape[-2:])  # for explain: the cross-attention's key grid
        return self.decoder(tgt, query_pos, memory, pos, key_mask)

    def forward_head(self, hs: list[Tensor]) -> dict[str, Tensor]:
        out = {"logits": self.class_embed(hs[-1]), "boxes": self.bbox_embed(hs[-1])}
        if self.cfg.aux_loss and len(hs) > 1:
            aux = torch.stack(hs[:-1])
            out["aux_logits"] = self.class_embed(aux)
            out["aux_boxes"] = self.bbox_embed(aux)
        return out

    def forward(self, x: Tensor, pixel_mask: Tensor | None = None) -> dict[str, Tensor]:
        return self.forward_head(self.forward_features(x, pixel_mask))


# Carion et al. 2020, Table 1 (R50 backbone, 41.3 M parameters, 42.0 AP at 500 epochs).
DETR_VARIANTS: dict[str, DETRConfig] = {
    "detr_resnet50": DETRConfig(backbone="resnet50"),
    "detr_vit_small_patch16": DETRConfig(backbone="vit_small_patch16_224",
                                         backbone_args={"dynamic_img_size": True}, img_size=224),
}

for _name, _cfg in DETR_VARIANTS.items():
    register_model(ModelEntry(name=_name, family="detr", config=_cfg, build=DETR, task="detection",
                              description=f"DETR detector on {_cfg.backbone}, {_cfg.num_queries} queries"))
