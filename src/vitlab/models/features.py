"""Feature-map backbones: ``create_model(NAME, features_only=True, out_indices=...)``, as timm's.

The classifier is built (and its weights loaded) as ``create_model`` builds it, then wrapped in a
:class:`FeatureExtractor` whose forward returns the chosen feature maps through the family's
``forward_intermediates``, as timm's ``FeatureGetterNet`` does for plain transformers and its ``FeatureListNet``
for the staged ones (Swin, MobileViT): the same maps, order, shapes and layout (timm's Swin gives NHWC), and the
same default ``out_indices`` (the last 3 blocks; every Swin stage; MobileViT's 5 stages; CrossViT's last block of
each branch). What the maps do not need is dropped, as timm prunes: the head, the final norms, the class-attention
blocks and the blocks / stages after the last one taken. ``feature_info`` offers timm's ``FeatureInfo`` accessors
(``channels()``, ``reduction()``, ``module_name()``, ``get_dicts()``), read off a meta-device probe of the model.

The state dict is the pruned classifier's under ``model.``: for the families timm wraps with ``FeatureGetterNet``
(ViT, DeiT, BEiT, CaiT, XCiT, CrossViT, TNT, Mixer) that is timm's feature model's layout wherever vitlab's
classifier keys are timm's; timm's Swin / MobileViT feature models flatten their modules (``layers_0``) instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("NCHW", "NHWC", "NLC")


class FeatureInfo:
    """timm's ``FeatureInfo``: one dict per feature the model offers (``num_chs``, ``reduction``, ``module``,
    ``index``); the accessors answer for ``out_indices`` unless given ``idx`` (indices into all features)."""

    def __init__(self, info: list[dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = info
        self.out_indices = tuple(out_indices)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        return FeatureInfo(copy.deepcopy(self.info), out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        def pick(i: int) -> dict[str, Any]:
            return self.info[i] if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (tuple, list)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self.info})"


# how each family exposes its features: the attribute holding the blocks / stages the indices count, the
# layout timm's feature model returns, the formats the family's forward_intermediates gives
_STAGED = {"swin": "layers", "swinv2": "layers", "mobilevit": "stages", "resnet": "stages"}
_DEFAULT_FMT = {"swin": "NHWC", "swinv2": "NHWC"}


def _family_formats(family: str) -> tuple[str, ...]:
    return FORMATS if family in ("swin", "swinv2") else ("NCHW", "NLC")


def _units(model: nn.Module, family: str) -> int:
    """How many features the model offers (before pruning)."""
    if family == "crossvit":
        return 2 * len(model.blocks)
    if family == "resnet":  # timm's count: the stem's activation, then every stage
        return len(model.stages) + 1
    return len(getattr(model, _STAGED.get(family, "blocks")))


def _default_out_indices(family: str, n: int) -> tuple[int, ...]:
    """timm 1.0.31's defaults: every stage (Swin, MobileViT via ByobNet's (0..4), ResNet's stem and stages), each CrossViT branch's
    last block, else the last 3 blocks (as absolute indices; fewer blocks: all of them)."""
    if family in _STAGED:
        return tuple(range(n))
    if family == "crossvit":
        return (n // 2 - 1, n - 1)
    return tuple(range(max(n - 3, 0), n))


def _resolve_indices(name: str, out_indices: Any, n: int) -> tuple[int, ...]:
    """Absolute indices as timm's ``feature_take_indices``: an int n takes the last n, negatives count from the
    end; out of range is a ValueError naming the model's number of features."""
    where = f"create_model({name!r}, features_only=True)"
    if isinstance(out_indices, bool) or not isinstance(out_indices, (int, tuple, list)):
        raise TypeError(f"{where}: out_indices must be an int (the last n features) or a sequence of feature "
                        f"indices, got {out_indices!r}")
    if isinstance(out_indices, int):
        if not 0 < out_indices <= n:
            raise ValueError(f"{where}: out_indices={out_indices} (the last n) is out of range: the model has {n} "
                             f"features, so n must be in 1..{n}")
        return tuple(range(n - out_indices, n))
    if not out_indices:
        raise ValueError(f"{where}: out_indices is empty; the model has {n} features (indices 0..{n - 1})")
    out = []
    for i in out_indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{where}: out_indices entries must be ints, got {i!r}")
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise ValueError(f"{where}: out_indices entry {i} is out of range: the model has {n} features "
                             f"(indices 0..{n - 1}, or -{n}..-1 from the end)")
        out.append(j)
    return tuple(out)


def _feature_dicts(entry: Any, model: nn.Module) -> list[dict[str, Any]]:
    """Channels and reduction of every feature, from a forward of a meta-device twin at the model's input size
    (no memory, no compute); module names as timm's."""
    family = entry.family
    with torch.device("meta"):
        probe = entry.build(model.cfg).eval()  # eval: batch norm takes a 1 x 1 map
    size = model.preprocessing.input_size
    if family in ("mobilevit", "resnet"):  # convolutional: any size; one where every stage halves the map
        size = (size[0], 256, 256)
    x = torch.empty(1, *size, device="meta")
    feats = _forward(probe, family, x, tuple(range(_units(probe, family))), "NCHW", len(probe.blocks)
                     if family == "crossvit" else 0)
    info = []
    attr = _STAGED.get(family, "blocks")
    n_blocks = len(getattr(probe, attr))
    for i, f in enumerate(feats):
        unit = i % n_blocks
        module = f"{attr}.{unit}"
        if family == "resnet":  # index 0: the stem's activation (timm's act1), i: stage i - 1 (timm's layer<i>)
            module = "stem.act" if i == 0 else f"stages.{i - 1}"
        if family == "mobilevit" and unit == n_blocks - 1:  # timm taps its last stage after final_conv
            module = "final_conv"
        reduction = round(size[1] / f.shape[2])
        if family == "crossvit":  # timm's nominal stride: the patch over the branch's scale
            b = i // n_blocks
            reduction = round(model.cfg.patch_size[b] / model.cfg.branch_scale[b])
        d: dict[str, Any] = {"num_chs": int(f.shape[1]), "reduction": reduction, "module": module, "index": i}
        if family == "mobilevit":
            d["stage"] = i + 1
        info.append(d)
    return info


def _forward(model: nn.Module, family: str, x: Tensor, take: tuple[int, ...], fmt: str,
             n_blocks: int = 0) -> list[Tensor]:
    """The maps of features ``take`` (absolute indices); ``n_blocks``: CrossViT's blocks before pruning."""
    if family == "crossvit":
        return _crossvit_features(model, x, take, fmt, n_blocks)
    if family in ("swin", "swinv2"):
        return model.forward_intermediates(x, list(take), output_fmt=fmt, intermediates_only=True)
    feats = model.forward_intermediates(x, list(take), output_fmt="NLC" if fmt == "NLC" else "NCHW",
                                        intermediates_only=True)
    return list(feats)


def _crossvit_features(model: nn.Module, x: Tensor, take: tuple[int, ...], fmt: str, n: int) -> list[Tensor]:
    """timm's CrossViT features: each branch's patch tokens after each of the ``n`` multi-scale blocks,
    branch-major (index b * n + i), each on its own grid."""
    blocks = {i % n for i in take}
    _, kept = model._run_blocks(model._embed(x), blocks)
    by_block = dict(zip(sorted(blocks), kept))
    out = []
    for b in range(2):
        for i in sorted(blocks):
            if b * n + i not in take:
                continue
            y = by_block[i][b][:, 1:]  # (B, N_b, D_b) patch tokens, class token dropped
            if fmt == "NCHW":
                y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], *model.grids[b])  # (B, D_b, rows, cols)
            out.append(y)
    return out


def _prune(model: nn.Module, family: str, take: tuple[int, ...]) -> None:
    """Drop what the chosen features do not need, as timm's ``prune_intermediate_layers`` (with the head)."""
    n = len(model.blocks) if family == "crossvit" else _units(model, family)
    last = max(i % n for i in take) if family == "crossvit" else max(take)
    attr = _STAGED.get(family, "blocks")
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(0)
    if family == "mobilevit":
        if last < n - 1:
            model.final_conv = nn.Identity()
    elif family == "crossvit":
        model.norm = nn.ModuleList([nn.Identity() for _ in model.norm])
    elif family != "resnet":
        model.norm = nn.Identity()
    for extra in ("fc_norm", "head_drop"):
        if isinstance(getattr(model, extra, None), nn.Module):
            setattr(model, extra, nn.Identity())
    for extra in ("blocks_token_only", "cls_attn_blocks"):  # CaiT / XCiT class attention: after the features
        if isinstance(getattr(model, extra, None), nn.ModuleList):
            setattr(model, extra, nn.ModuleList())
    setattr(model, attr, getattr(model, attr)[:last if family == "resnet" else last + 1])


class FeatureExtractor(nn.Module):
    """A classifier's feature maps: ``forward(x)`` returns the maps of ``out_indices`` (a list, in index order).

    Attributes:
        model: the pruned classifier.
        feature_info: timm's :class:`FeatureInfo` (``channels()``, ``reduction()``, ``module_name()``).
        out_indices: the absolute indices of the returned features.
        output_fmt: "NCHW" (B, C, H, W), "NHWC" (Swin's default, as timm's) or "NLC" (B, H*W, C).
    """

    def __init__(self, model: nn.Module, family: str, out_indices: tuple[int, ...], output_fmt: str,
                 info: list[dict[str, Any]], info_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.family = family
        self.out_indices = out_indices
        self.output_fmt = output_fmt
        self.feature_info = FeatureInfo(info, out_indices if info_indices is None else info_indices)
        self._n_blocks = len(model.blocks) if family == "crossvit" else 0
        _prune(model, family, out_indices)
        self.model = model
        self.model_name = getattr(model, "model_name", None)

    @property
    def preprocessing(self) -> Any:
        return self.model.preprocessing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> list[Tensor]:
        return _forward(self.model, self.family, x, self.out_indices, self.output_fmt, self._n_blocks)


def features_only_model(name: str, entry: Any, model: nn.Module, out_indices: Any = None,
                        output_fmt: str | None = None) -> FeatureExtractor:
    """Wrap the built classifier ``model`` of registry ``entry`` as a :class:`FeatureExtractor`."""
    where = f"create_model({name!r}, features_only=True)"
    family = entry.family
    if entry.task != "classification" or not hasattr(model, "forward_intermediates"):
        raise ValueError(f"{where}: {name} is a {entry.task} model; features_only builds a classifier's "
                         f"backbone (e.g. the ViT or ResNet its backbone is: `vitlab models`)")
    formats = _family_formats(family)
    fmt = _DEFAULT_FMT.get(family, "NCHW") if output_fmt is None else output_fmt
    if fmt not in formats:
        raise ValueError(f"{where}: output_fmt must be one of {', '.join(map(repr, formats))} for the {family} "
                         f"family, got {output_fmt!r}")
    n = _units(model, family)
    take = _default_out_indices(family, n) if out_indices is None else _resolve_indices(name, out_indices, n)
    info = _feature_dicts(entry, model)
    # timm's FeatureListNet families (Swin, MobileViT) keep the indices as given in feature_info.out_indices
    # (negative ones too: FeatureInfo indexes its list with them); its FeatureGetterNet ones the absolute indices
    as_given = family in _STAGED and out_indices is not None
    info_indices = (tuple(range(-out_indices, 0)) if isinstance(out_indices, int) else tuple(out_indices)) \
        if as_given else None
    return FeatureExtractor(model, family, take, fmt, info, info_indices)
