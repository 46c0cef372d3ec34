"""Swin's explainers: rollout, gradient rollout and last-layer maps carried through windows, shifts and
patch merging (:mod:`vitlab.analysis.windows`). Imported by :mod:`vitlab.analysis.explain` on first use."""

from vitlab.analysis.explain_windows import register_windowed
from vitlab.models.swin import SwinTransformer

register_windowed(SwinTransformer)
