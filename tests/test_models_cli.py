"""`vitlab models` errors and JSON, and the README's model table naming only registered models."""

from __future__ import annotations

import fnmatch
import itertools
import json
import re
from pathlib import Path

from vitlab.cli.main import main
from vitlab.models import list_models

README = Path(__file__).resolve().parents[1] / "README.md"


def test_an_unknown_family_is_named_with_the_valid_ones(caplog, capsys) -> None:
    assert main(["models", "--family", "mobilevitv2"]) != 0
    assert "--family 'mobilevitv2': no such family" in caplog.text
    assert "mobilevit" in caplog.text and "detr" in caplog.text  # the task models' families too
    assert capsys.readouterr().out == ""


def test_json_without_a_match_is_still_json(caplog, capsys) -> None:
    assert main(["models", "--json", "nosuch*"]) == 1
    assert json.loads(capsys.readouterr().out) == []
    assert "no model matches 'nosuch*'" in caplog.text


def _expand(pattern: str) -> list[str]:
    parts = re.split(r"(\{[^}]*\})", pattern)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_name_in_the_readme_model_table_is_registered() -> None:
    text = README.read_text()
    table = text[text.index("## Supported models"):text.index("## Checkpoint formats")]
    names = set(list_models(task=None))
    checked = 0
    for row in table.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or not cells[3].strip().startswith("`"):
            continue
        for pattern in re.findall(r"`([a-z0-9_{},*]+)`", cells[3]):
            if not re.search(r"[0-9{*]", pattern):  # config fields and name parts (`img_size`, `_gap_`)
                continue
            for name in _expand(pattern):
                assert fnmatch.filter(names, name), f"README model table: {name!r} (from {pattern!r}) is not registered"
                checked += 1
    assert checked > 100
