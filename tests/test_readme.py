"""The README's Python examples run as written (blocks marked `<!-- not-run ... -->` need files users bring)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- not-run[^>]*-->\s*)?```python\n(.*?)```", re.S)


def _blocks() -> list[str]:
    return [code for marker, code in BLOCK.findall(README.read_text()) if not marker]


def test_readme_has_python_examples() -> None:
    assert len(_blocks()) >= 2


def _missing_extras(code: str) -> list[str]:
    """Optional-extra modules a block imports that are not installed (``vitlab[export]``'s onnxruntime...)."""
    mods = set(re.findall(r"^import (onnxruntime|onnx|onnxscript)\b", code, re.M))
    return sorted(m for m in mods if importlib.util.find_spec(m) is None)


def test_readme_python_examples_run(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    skipped: list[str] = []
    try:
        namespace: dict = {}
        for code in _blocks():  # later blocks use names defined by earlier ones, as a reader would
            if missing := _missing_extras(code):
                skipped += missing
                continue
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"README example failed: {type(e).__name__}: {e}")
    finally:
        os.chdir(cwd)
    if skipped:
        pytest.skip(f"the other README examples ran; those importing {', '.join(skipped)} need vitlab[export]")


def test_readme_has_an_onnx_serving_example() -> None:
    assert any("import onnxruntime" in code and "custom_metadata_map" in code for code in _blocks())
