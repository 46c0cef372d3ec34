"""Tiny Swin v2 settings for the registry-wide tests (see tiny_swin.py)."""

from __future__ import annotations

from tiny_swin import tiny  # noqa: F401  (same shape for both versions)

FAMILY = "swinv2"
