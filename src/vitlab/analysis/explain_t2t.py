"""Attention rollout over T2T-ViT's backbone.

The backbone blocks attend over [class token, patches] of the 14 x 14 (at 224 px) grid, one sequence:
rollout over them is ViT's. The two T2T layers attend over the soft-split tokens (56 x 56, then 28 x 28
overlapping windows), other sequences that the soft splits mix spatially; they are left out, so the map
stops at the backbone's tokens (each covering a 16 x 16 stride with overlapping receptive fields).
"""

from __future__ import annotations

from vitlab.analysis.capture import TokenLayout
from vitlab.analysis.explain import register_explainer
from vitlab.analysis.partial_capture import explain_token_layers
from vitlab.models.t2t import T2TViT


def _explain(model: T2TViT, x, *, method: str, target, head_fusion, discard_ratio):
    t2t = model.tokens_to_token
    layout = TokenLayout(grid=t2t.dynamic_grid(x.shape[-2], x.shape[-1]), patch_size=t2t.patch_size,
                         num_prefix_tokens=1)
    return explain_token_layers(model, x, [blk.attn for blk in model.blocks], layout, method=method,
                                target=target, head_fusion=head_fusion, discard_ratio=discard_ratio)


for _method in ("rollout", "grad-rollout", "last-layer"):
    register_explainer(T2TViT, _method)(
        lambda model, x, *, target, head_fusion, discard_ratio, _m=_method: _explain(
            model, x, method=_m, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio))
