"""The README's Python examples run as written (blocks marked `<!-- not-run ... -->` need files users bring)."""

from __future__ import annotations

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


def test_readme_python_examples_run(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        for code in _blocks():  # later blocks use names defined by earlier ones, as a reader would
            exec(compile(code, str(README), "exec"), namespace)  # noqa: S102
    except Exception as e:  # pragma: no cover - the message is the point
        pytest.fail(f"README example failed: {type(e).__name__}: {e}")
    finally:
        os.chdir(cwd)
