"""``vitlab info``: each published weight's preprocessing in the text report, the default marked, and
``vitlab info NAME.TAG`` (names as ``vitlab models --pretrained`` prints them)."""

from __future__ import annotations

import json
import logging

from vitlab.cli.main import main


def _info(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["info", *argv])
    return rc, capsys.readouterr().out


def _weights_lines(out: str) -> dict[str, tuple[bool, str]]:
    """``NAME.TAG`` -> (marked default, the line under it: its preprocessing)."""
    lines = out.splitlines()
    return {line.split()[1].rstrip(":"): (line.split()[2] == "(default):", lines[i + 1].strip())
            for i, line in enumerate(lines) if line.startswith("  weights ")}


def test_each_weight_shows_its_preprocessing_and_the_default_is_marked(capsys):
    rc, out = _info(capsys, "vit_small_patch16_224")
    assert rc == 0
    rows = _weights_lines(out)
    # timm's default tag (what pretrained=True loads) is marked, and no other
    assert [k for k, (default, _) in rows.items() if default] == ["vit_small_patch16_224.augreg_in21k_ft_in1k"]
    assert rows["vit_small_patch16_224.augreg_in21k_ft_in1k"][1] == "224x224, crop 0.9, bicubic, mean 0.5 std 0.5"
    # DINO's backbone was trained with ImageNet's statistics, unlike the name's own (0.5)
    assert rows["vit_small_patch16_224.dino"][1] == ("224x224, crop 0.9, bicubic, mean 0.485,0.456,0.406 "
                                                     "std 0.229,0.224,0.225")


def test_a_squashed_crop_is_shown(capsys):
    """timm evaluates vit_medium_patch16_gap_384's weights with crop_mode="squash"."""
    rc, out = _info(capsys, "vit_medium_patch16_gap_384")
    assert rc == 0
    assert _weights_lines(out) == {"vit_medium_patch16_gap_384.sw_in12k_ft_in1k": (
        True, "384x384, crop 0.95 squash, bicubic, mean 0.5 std 0.5")}


def test_name_dot_tag_shows_the_model_those_weights_build(capsys):
    """mobilevitv2_150's 22k weights were fine-tuned at 384 px with crop 1.0: the model at 384, that row alone."""
    rc, out = _info(capsys, "mobilevitv2_150.cvnets_in22k_ft_in1k_384")
    assert rc == 0
    assert out.startswith("mobilevitv2_150.cvnets_in22k_ft_in1k_384  (mobilevit)")
    assert "input size     (3, 384, 384)" in out and "at 384x384" in out and "crop fraction  1.0," in out
    assert list(_weights_lines(out)) == ["mobilevitv2_150.cvnets_in22k_ft_in1k_384"]
    rc, default_out = _info(capsys, "mobilevitv2_150")
    assert "input size     (3, 256, 256)" in default_out  # the bare name: the variant's own size


def test_name_dot_tag_json_has_the_weights_classes_and_statistics(capsys):
    rc, out = _info(capsys, "vit_small_patch16_224.dino", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["num_classes"] == 0  # DINO's headless backbone, as timm publishes it
    assert info["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert [w["tag"] for w in info["pretrained"]] == ["dino"]


def test_unknown_tag_or_model_is_an_error_naming_it(capsys, caplog):
    with caplog.at_level(logging.ERROR):
        assert main(["info", "vit_small_patch16_224.nope"]) == 2
        assert main(["info", "nope_model.dino"]) == 2
    text = caplog.text
    assert "'vit_small_patch16_224' has no weights tagged 'nope'; known: augreg_in21k_ft_in1k" in text
    assert "unknown model 'nope_model'" in text
    assert capsys.readouterr().out == ""
