"""DETR's box arithmetic, Hungarian matcher and set loss against hand-computed values and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from vitlab.tasks import HungarianMatcher, SetCriterion, box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from vitlab.tasks.boxes import xywh_to_xyxy, xyxy_to_xywh


def test_box_conversions_by_hand() -> None:
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(cxcywh_to_xyxy(b), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(b)), b)
    torch.testing.assert_close(xywh_to_xyxy(torch.tensor([[1.0, 2.0, 3.0, 4.0]])), torch.tensor([[1.0, 2.0, 4.0, 6.0]]))
    torch.testing.assert_close(xyxy_to_xywh(torch.tensor([[1.0, 2.0, 4.0, 6.0]])), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))


def test_iou_and_giou_by_hand() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [3.0, 0.0, 4.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    iou, _ = box_iou(a, b)
    # overlap 1, union 4 + 4 - 1 = 7; disjoint; identical
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0]]))
    giou = generalized_box_iou(a, b)
    # hull of the first pair 3x3 = 9: 1/7 - (9 - 7)/9; second: hull 4x2 = 8, union 5: 0 - 3/8
    torch.testing.assert_close(giou, torch.tensor([[1 / 7 - 2 / 9, -3 / 8, 1.0]]))
    with pytest.raises(ValueError, match="x1 >= x0"):
        generalized_box_iou(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), a)


def _random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    c = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    return torch.cat([c, wh], 1)


@pytest.mark.parametrize("seed", range(6))
def test_matcher_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    Q, T, C = 5, int(torch.randint(1, 5, (1,), generator=g)), 3
    logits = torch.randn(1, Q, C + 1, generator=g)
    boxes = _random_boxes(Q, g)[None]
    target = {"labels": torch.randint(0, C, (T,), generator=g), "boxes": _random_boxes(T, g)}
    matcher = HungarianMatcher()
    cost = matcher.cost_matrix(logits[0], boxes[0], target["labels"], target["boxes"])
    best = min(itertools.permutations(range(Q), T), key=lambda p: sum(cost[p[j], j].item() for j in range(T)))
    (rows, cols), = matcher(logits, boxes, [target])
    assert len(rows) == T
    got = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
    assert got == pytest.approx(sum(cost[best[j], j].item() for j in range(T)), abs=1e-6)


def test_matcher_cost_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    labels, tb = torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = HungarianMatcher().cost_matrix(logits[0], boxes[0], labels, tb)
    torch.testing.assert_close(cost, torch.tensor([[-0.25 * 1 + 0 * 5 - 1.0 * 2]]))


def test_set_loss_normalises_by_boxes_in_the_whole_batch() -> None:
    crit = SetCriterion(2, aux=False)
    logits = torch.zeros(2, 3, 3)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 3, [[0.5, 0.5, 0.4, 0.4]] * 3])
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.6, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4]])}]
    total, parts = crit({"logits": logits, "boxes": boxes}, targets)
    # L1: one pair off by 0.1 in cx; summed over all pairs, divided by 3 boxes (not per image)
    assert parts["loss_bbox"].item() == pytest.approx(0.1 / 3, abs=1e-6)
    # GIoU of the shifted box: overlap 0.1*0.2, union 0.06, hull 0.3*0.2 = union -> 1 - 1/3
    assert parts["loss_giou"].item() == pytest.approx((1 - 0.02 / 0.06) / 3, abs=1e-6)
    # CE with uniform logits is log 3 for every query, whatever the weights
    assert parts["loss_ce"].item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), abs=1e-6)
    assert total.item() == pytest.approx(parts["loss_ce"].item() + 5 * 0.1 / 3 + 2 * (2 / 3) / 3, abs=1e-6)


def test_no_object_weight_and_aux_layers_are_rematched() -> None:
    crit = SetCriterion(2, eos_coef=0.1)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, 3, generator=g)
    boxes = _random_boxes(4, g)[None]
    targets = [{"labels": torch.tensor([1]), "boxes": _random_boxes(1, g)}]
    aux = {"aux_logits": torch.stack([logits.flip(1), logits]), "aux_boxes": torch.stack([boxes.flip(1), boxes])}
    total, parts = crit({"logits": logits, "boxes": boxes, **aux}, targets)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(parts[f"{k}_1"], parts[k])  # the same predictions -> the same loss
        torch.testing.assert_close(parts[f"{k}_0"], parts[k])  # permuted queries -> rematched, same loss
    torch.testing.assert_close(total, 3 * (parts["loss_ce"] + 5 * parts["loss_bbox"] + 2 * parts["loss_giou"]))
    # the no-object weight by hand
    (q, _), = crit.matcher(logits, boxes, targets)
    tc = torch.full((4,), 2)
    tc[q] = 1
    w = torch.tensor([1.0, 1.0, 0.1])[tc]
    nll = -torch.log_softmax(logits[0], -1)[torch.arange(4), tc]
    assert parts["loss_ce"].item() == pytest.approx(((w * nll).sum() / w.sum()).item(), abs=1e-6)


def test_bfloat16_predictions_are_scored_in_float32_against_float32_targets() -> None:
    """Under bfloat16 autocast the heads give bfloat16 logits and boxes: the targets and the no-object weight were
    rounded to them and the GIoU computed in bfloat16 (its gradient 7% off). Now each term equals the float32
    loss of the same (bfloat16-valued) predictions, as in transformers' DETR loss, gradients included."""
    crit = SetCriterion(2, eos_coef=0.1, aux=False)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 3, generator=g).bfloat16()
    boxes = _random_boxes(12, g).reshape(2, 6, 4).bfloat16()
    targets = [{"labels": torch.tensor([0, 1]), "boxes": _random_boxes(2, g) * 0.977 + 0.0113},
               {"labels": torch.tensor([1]), "boxes": _random_boxes(1, g) * 0.977 + 0.0113}]
    half = {k: v.clone().requires_grad_() for k, v in (("logits", logits), ("boxes", boxes))}
    full = {k: v.detach().float().requires_grad_() for k, v in half.items()}
    _, got = crit(half, targets)
    _, ref = crit(full, targets)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6)
    (got["loss_giou"] + got["loss_ce"]).backward()
    (ref["loss_giou"] + ref["loss_ce"]).backward()
    torch.testing.assert_close(half["boxes"].grad.float(), full["boxes"].grad.bfloat16().float())
    torch.testing.assert_close(half["logits"].grad.float(), full["logits"].grad.bfloat16().float())
