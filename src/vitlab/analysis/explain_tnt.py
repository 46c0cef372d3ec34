"""Attention rollout over TNT's outer transformer.

The outer attention is token-to-token over [class token, patches], one sequence, as in ViT: rollout over
the outer layers is the usual one. The inner attention (among the 16 pixels of each patch) is over other
sequences and is left out; what it contributes reaches the patch tokens through the pixel-to-patch
projection, a residual path the rollout treats as part of the identity.
"""

from __future__ import annotations

from vitlab.analysis.capture import TokenLayout
from vitlab.analysis.explain import register_explainer, uses_class_token
from vitlab.analysis.partial_capture import explain_token_layers
from vitlab.models.tnt import TNT


def _explain(model: TNT, x, *, method: str, target, head_fusion, discard_ratio):
    pe = model.pixel_embed
    layout = TokenLayout(grid=pe.dynamic_grid(x.shape[-2], x.shape[-1]), patch_size=pe.patch_size, num_prefix_tokens=1)
    return explain_token_layers(model, x, [blk.attn_out for blk in model.blocks], layout, method=method,
                                target=target, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                use_class_token=uses_class_token(model))


for _method in ("rollout", "grad-rollout", "last-layer"):
    register_explainer(TNT, _method)(
        lambda model, x, *, target, head_fusion, discard_ratio, _m=_method: _explain(
            model, x, method=_m, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio))
