"""Dense tasks on vitlab backbones: detection (DETR's boxes, matcher and set loss) and segmentation."""

from vitlab.tasks.boxes import box_iou, cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from vitlab.tasks.matcher import HungarianMatcher
from vitlab.tasks.set_loss import SetCriterion

__all__ = ["HungarianMatcher", "SetCriterion", "box_iou", "cxcywh_to_xyxy", "generalized_box_iou", "xyxy_to_cxcywh"]
