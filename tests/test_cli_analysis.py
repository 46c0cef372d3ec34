"""`vitlab explain`, `vitlab analyze` and `vitlab fewshot` end to end on a tiny checkpoint and the digits."""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitlab
from vitlab.cli.main import build_parser, main

from model_helpers import perturb_

DIGIT_CLASSES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=4, img_size=16,
                                patch_size=4, in_chans=1, num_classes=10, mean=(0.5,), std=(0.5,))
    perturb_(model, std=0.1)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    vitlab.save_model(model, path, class_names=DIGIT_CLASSES)
    return path


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory) -> list[Path]:
    from vitlab.data import build_dataset

    ds = build_dataset("digits", split="test")
    folder = tmp_path_factory.mktemp("pngs")
    paths = []
    for i in range(3):
        img, label = ds[i]
        p = folder / f"digit{i}_{label}.png"
        Image.fromarray(img[0].numpy()).save(p)  # uint8 (1, 8, 8) -> grayscale PNG
        paths.append(p)
    return paths


def _help(cmd: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[cmd].format_help()


@pytest.mark.parametrize("cmd", ["explain", "analyze", "fewshot"])
def test_help_has_an_example(cmd: str) -> None:
    text = _help(cmd)
    assert "example:" in text and f"vitlab {cmd} " in text


@pytest.mark.parametrize("method", ["rollout", "grad-rollout", "last-layer"])
def test_explain_writes_one_png_per_image(tmp_path, checkpoint, digit_pngs, capsys, method) -> None:
    out = tmp_path / "explain"
    extra = ["--class", "3"] if method == "grad-rollout" else ["--head-fusion", "max", "--discard-ratio", "0.5"]
    rc = main(["explain", *map(str, digit_pngs), "--checkpoint", str(checkpoint), "--method", method,
               "--output", str(out), *extra])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == len(digit_pngs) and sorted(map(str, pngs)) == sorted(printed)
    for p in pngs:
        assert p.name.endswith(f"_{method}.png")
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (900, 340)


def test_explain_grad_rollout_depends_on_the_class(tmp_path, checkpoint, digit_pngs) -> None:
    def run(cls: str) -> bytes:
        out = tmp_path / cls
        assert main(["explain", str(digit_pngs[0]), "--checkpoint", str(checkpoint), "--method", "grad-rollout",
                     "--class", cls, "--output", str(out)]) == 0
        return next(out.glob("*.png")).read_bytes()

    assert run("1") != run("7")


def test_explain_rejects_unknown_class(tmp_path, checkpoint, digit_pngs, caplog) -> None:
    rc = main(["explain", str(digit_pngs[0]), "--checkpoint", str(checkpoint), "--class", "cat",
               "--output", str(tmp_path)])
    assert rc == 2
    assert "not one of the model's classes" in caplog.text


def test_analyze_writes_figures_report_and_numbers(tmp_path, checkpoint, capsys) -> None:
    out = tmp_path / "analysis"
    rc = main(["analyze", "--checkpoint", str(checkpoint), "--data", "digits", "--output", str(out),
               "--num-images", "40", "--components", "12"])
    assert rc == 0
    report = out / "report.html"
    assert capsys.readouterr().out.strip() == str(report)
    text = report.read_text()
    links = re.findall(r"(?:src|href)='([^']+)'", text)
    assert {"attention_distance.png", "position_similarity.png", "embedding_filters.png"} <= set(links)
    assert all((out / link).is_file() for link in links)
    for name in ("attention_distance.png", "position_similarity.png", "embedding_filters.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    numbers = json.loads((out / "analysis.json").read_text())
    assert numbers["num_images"] == 40 and numbers["grid"] == [4, 4] and numbers["patch_size"] == [4, 4]
    dist = numbers["attention_distance"]["pixels"]
    assert len(dist) == 2 and all(len(row) == 4 for row in dist)
    # a 4x4 grid of 4-px patches: no head can average beyond the grid's diagonal
    assert all(0 <= d <= 4 * 3 * 2**0.5 for row in dist for d in row)
    uniform = numbers["attention_distance"]["uniform_reference"]
    pts = [(4 * r, 4 * c) for r in range(4) for c in range(4)]
    assert uniform == pytest.approx(sum(math.dist(p, q) for p in pts for q in pts) / 256, rel=1e-5)
    assert numbers["position_similarity"]["kind"] == "learn"
    assert len(numbers["embedding_filters"]["explained_variance_ratio"]) == 12
    assert "vitlab analyze --checkpoint" in text and "digits" in text and "vit_tiny_patch16_224" in text


def test_fewshot_table_and_json(checkpoint, capsys) -> None:
    args = ["fewshot", "--checkpoint", str(checkpoint), "--data", "digits", "--shots", "1,5", "--seeds", "2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\s+1\s+\d+\.\d+% ± ", table, re.MULTILINE) and re.search(r"^\s+5\s+", table, re.MULTILINE)
    assert main([*args, "--json", "--max-test", "100"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["num_classes"] == 10 and got["num_test"] == 100 and got["feature_dim"] == 64
    assert got["num_train"] == 10 * 5 * 2  # the default pool: max shots x seeds per class
    assert [r["shots"] for r in got["results"]] == [1, 5]
    for r in got["results"]:
        assert len(r["linear"]) == 2 and 0.0 <= r["linear_mean"] <= 1.0 and r["knn_k"] == min(5, r["shots"])


def test_fewshot_skips_shot_counts_a_small_class_cannot_fill(tmp_path, checkpoint, capsys, caplog) -> None:
    """A folder whose smallest class has 6 training images: the default 1,5,10,25 stopped with an error at 10; the
    counts that fit are reported and the others named, and a request none of whose counts fit names the class."""
    from vitlab.data import build_dataset

    ds = build_dataset("digits", split="train")
    seen: dict[int, int] = {}
    for img, label in (ds[i] for i in range(len(ds))):
        if label < 3 and seen.get(label, 0) < (6 if label == 2 else 12):
            (tmp_path / "data" / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy()).save(tmp_path / "data" / str(label) / f"{seen.get(label, 0)}.png")
            seen[label] = seen.get(label, 0) + 1
    args = ["fewshot", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--seeds", "2", "--json"]
    assert main(args) == 0
    got = json.loads(capsys.readouterr().out)
    fewest = min(torch.bincount(torch.tensor(
        [label for _, label in build_dataset(str(tmp_path / "data"), split="train", transform=None)])).tolist())
    assert [r["shots"] for r in got["results"]] == [s for s in (1, 5, 10, 25) if s <= fewest] and fewest < 10
    assert "--shots 10,25 skipped: class '2'" in caplog.text
    assert main([*args, "--shots", "20"]) == 2
    assert f"--shots 20: class '2' has {fewest} training image(s)" in caplog.text


def test_fewshot_rejects_bad_shots(checkpoint, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fewshot", "--checkpoint", str(checkpoint), "--data", "digits", "--shots", "1,x"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_explain_and_predict_take_a_folder_and_keep_same_named_images_apart(tmp_path, checkpoint, digit_pngs,
                                                                               capsys) -> None:
    folder = tmp_path / "in"
    (folder / "more").mkdir(parents=True)
    for p in digit_pngs:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "more" / digit_pngs[0].name).write_bytes(digit_pngs[1].read_bytes())  # same name, other image
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--json"]) == 0
    by_folder = json.loads(capsys.readouterr().out)
    listed = sorted(map(str, [*folder.glob("*.png"), *folder.glob("more/*.png")]))
    assert sorted(r["image"] for r in by_folder) == listed
    assert main(["predict", *listed, "--checkpoint", str(checkpoint), "--json"]) == 0
    assert sorted(by_folder, key=lambda r: r["image"]) == sorted(json.loads(capsys.readouterr().out),
                                                                 key=lambda r: r["image"])
    out = tmp_path / "maps"
    assert main(["explain", str(folder), "--checkpoint", str(checkpoint), "--method", "rollout",
                 "--output", str(out)]) == 0
    stem = digit_pngs[0].stem
    assert len(list(out.glob("*.png"))) == len(digit_pngs) + 1
    assert (out / f"{stem}_rollout.png").is_file() and (out / f"{stem}-1_rollout.png").is_file()
    assert main(["predict", str(tmp_path / "maps" / "none"), "--checkpoint", str(checkpoint)]) == 2


def test_predict_and_explain_stop_at_a_bad_image_or_skip_it_when_asked(tmp_path, checkpoint, digit_pngs, capsys,
                                                             caplog) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for p in digit_pngs[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["predict", str(folder), "--checkpoint", str(checkpoint)]) == 2
    assert "broken.png: not an image file" in caplog.text and "--skip-bad-images" in caplog.text
    capsys.readouterr()
    assert main(["predict", str(folder), "--checkpoint", str(checkpoint), "--skip-bad-images", "--json"]) == 0
    rows = {Path(r["image"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"broken.png", *(p.name for p in digit_pngs[:2])}
    assert "not an image file" in rows["broken.png"]["error"] and "predictions" not in rows["broken.png"]
    assert all(len(rows[p.name]["predictions"]) == 5 for p in digit_pngs[:2])
    out = tmp_path / "maps"
    assert main(["explain", str(folder), "--checkpoint", str(checkpoint), "--method", "rollout",
                 "--output", str(out)]) == 2
    assert main(["explain", str(folder), "--checkpoint", str(checkpoint), "--method", "rollout",
                 "--output", str(out), "--skip-bad-images"]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}_rollout.png" for p in digit_pngs[:2])
