"""Attention maps of CCT: rollout read through sequence pooling.

CCT's tokens attend over one sequence (the convolutional tokenizer's grid, plus a class token with
``global_pool="token"``), so rollout over its blocks is ViT's. With sequence pooling (the default) the head
reads sum_i w_i x_i, w = softmax over the tokens of a Linear(D, 1) of the final tokens: the relevance of a
token is then the w-weighted mix of the joint attention's rows (rollout, grad-rollout), and "last-layer"
is w itself, the attention the head pays to each token. Class-token and average pooling read the joint
attention as ViT's do.
"""

from __future__ import annotations

from vitlab.analysis.capture import TokenLayout
from vitlab.analysis.explain import register_explainer
from vitlab.analysis.partial_capture import explain_token_layers
from vitlab.models.cct import CCT


def _explain(model: CCT, x, *, method: str, target, head_fusion, discard_ratio):
    tok = model.tokenizer
    layout = TokenLayout(grid=tok.dynamic_grid(x.shape[-2], x.shape[-1]), patch_size=tok.patch_size,
                         num_prefix_tokens=model.num_prefix_tokens)
    return explain_token_layers(model, x, [blk.attn for blk in model.blocks], layout, method=method, target=target,
                                head_fusion=head_fusion, discard_ratio=discard_ratio,
                                use_class_token=model.global_pool == "token",
                                pool_logits=model.attn_pool if model.global_pool == "seq" else None)


for _method in ("rollout", "grad-rollout", "last-layer"):
    register_explainer(CCT, _method)(
        lambda model, x, *, target, head_fusion, discard_ratio, _m=_method: _explain(
            model, x, method=_m, target=target, head_fusion=head_fusion, discard_ratio=discard_ratio))
