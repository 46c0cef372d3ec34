"""models/pretrained.json: published weights as data (generated from timm's configurations by
tools/make_pretrained_table.py), and ``create_model("name.tag", pretrained=True)`` building the model those
weights were trained as."""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab.checkpoints.converters import get_converter
from vitlab.models import get_entry, list_models
from vitlab.models.pretrained import find_weights, pretrained_weights

FIX = Path(__file__).resolve().parent / "fixtures"
ROWS = json.loads(resources.files("vitlab.models").joinpath("pretrained.json").read_text())["weights"]


def test_every_row_names_a_registered_model_a_readable_format_and_its_preprocessing():
    registered = set(list_models())
    seen = set()
    for r in ROWS:
        key = (r["model"], r["tag"])
        assert key not in seen, f"{key} twice"
        seen.add(key)
        assert r["model"] in registered, r
        get_converter(get_entry(r["model"]).family, r["format"])  # raises when vitlab cannot read the format
        assert r["hub"].startswith("hf-hub:") and r["num_classes"] >= 0, r
        assert len(r["input_size"]) == 3 and len(r["mean"]) == len(r["std"]) == r["input_size"][0], r
        assert 0 < r["crop_pct"] <= 1 and r["interpolation"] in ("bicubic", "bilinear", "nearest"), r
        assert r.get("crop_mode", "center") in ("center", "squash"), r


@pytest.mark.parametrize("model, tags", [
    ("beit_base_patch16_224", {"in22k_ft_in22k_in1k", "in22k_ft_in22k"}),
    ("beitv2_base_patch16_224", {"in1k_ft_in1k", "in1k_ft_in22k_in1k"}),
    ("beit3_base_patch16_224", {"in22k_ft_in1k"}),
    ("vit_small_patch16_224", {"dino"}),  # DINO's backbones as timm publishes them (issue 11)
    ("vit_base_patch16_224", {"dino", "mae"}),
    ("swin_tiny_patch4_window7_224", {"ms_in1k"}),
    ("mobilevit_s", {"cvnets_in1k"}),
])
def test_the_families_published_weights_are_listed(model, tags):
    assert tags <= {w.tag for w in pretrained_weights(model)}


# timm 1.0.31's default tag per name: timm.get_pretrained_cfg(NAME).tag, what timm.create_model(NAME,
# pretrained=True) loads. The first 26 were taken wrongly before (the table followed list_pretrained()'s
# alphabetical order and picked the first 1000-class row); then one name per family.
TIMM_DEFAULT_TAGS = [
    ("beitv2_base_patch16_224", "in1k_ft_in22k_in1k"),
    ("beitv2_large_patch16_224", "in1k_ft_in22k_in1k"),
    ("swin_base_patch4_window12_384", "ms_in22k_ft_in1k"),
    ("swin_base_patch4_window7_224", "ms_in22k_ft_in1k"),
    ("swin_small_patch4_window7_224", "ms_in22k_ft_in1k"),
    ("vit_base_patch16_224_miil", "in21k"),  # 11221 classes, as in timm
    ("vit_base_patch16_384", "augreg_in21k_ft_in1k"),
    ("vit_base_patch32_224", "augreg_in21k_ft_in1k"),
    ("vit_base_patch32_384", "augreg_in21k_ft_in1k"),
    ("vit_huge_patch14_224", "orig_in21k"),  # a headless backbone, as in timm
    ("vit_small_patch16_224", "augreg_in21k_ft_in1k"),
    ("vit_small_patch16_384", "augreg_in21k_ft_in1k"),
    ("xcit_large_24_p16_224", "fb_in1k"),
    ("xcit_large_24_p8_224", "fb_in1k"),
    ("xcit_medium_24_p16_224", "fb_in1k"),
    ("xcit_medium_24_p8_224", "fb_in1k"),
    ("xcit_nano_12_p16_224", "fb_in1k"),
    ("xcit_nano_12_p8_224", "fb_in1k"),
    ("xcit_small_12_p16_224", "fb_in1k"),
    ("xcit_small_12_p8_224", "fb_in1k"),
    ("xcit_small_24_p16_224", "fb_in1k"),
    ("xcit_small_24_p8_224", "fb_in1k"),
    ("xcit_tiny_12_p16_224", "fb_in1k"),
    ("xcit_tiny_12_p8_224", "fb_in1k"),
    ("xcit_tiny_24_p16_224", "fb_in1k"),
    ("xcit_tiny_24_p8_224", "fb_in1k"),
    ("xcit_large_24_p16_384", "fb_dist_in1k"),  # at 384 timm's default is the distilled one
    ("beit_base_patch16_224", "in22k_ft_in22k_in1k"),
    ("beit3_base_patch16_224", "in22k_ft_in1k"),
    ("cait_s24_224", "fb_dist_in1k"),
    ("crossvit_15_240", "in1k"),
    ("deit_base_patch16_224", "fb_in1k"),
    ("mixer_b16_224", "goog_in21k_ft_in1k"),
    ("mobilevit_s", "cvnets_in1k"),
    ("swinv2_base_window12_192", "ms_in22k"),  # 21841 classes
    ("tnt_s_patch16_224", "in1k"),
    ("vit_base_patch16_224", "augreg2_in21k_ft_in1k"),
    ("vit_medium_patch16_gap_384", "sw_in12k_ft_in1k"),
]


@pytest.mark.parametrize("name, tag", TIMM_DEFAULT_TAGS)
def test_a_bare_name_gets_timms_default_weights(name, tag):
    assert find_weights(name).tag == tag


def test_each_name_has_one_default_row_first():
    """What the generator guarantees: a name with timm rows has exactly one marked default (timm's default
    tag), its first row, in timm's format."""
    by_model: dict[str, list[dict]] = {}
    for r in ROWS:
        by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        defaults = [r["tag"] for r in rows if r.get("default")]
        if any(r["format"] == "timm" for r in rows):
            assert defaults == [rows[0]["tag"]] and rows[0]["format"] == "timm", (model, defaults)
            assert find_weights(model).tag == rows[0]["tag"] == pretrained_weights(model)[0].tag
        else:
            assert len(defaults) <= 1, model


def test_tagged_weights_and_unknown_tags():
    assert find_weights("vit_small_patch16_224", "dino").num_classes == 0
    with pytest.raises(ValueError, match="no weights tagged 'nope'"):
        find_weights("vit_small_patch16_224", "nope")


def _local(monkeypatch, path: Path, seen: list[str]):
    import vitlab.checkpoints as ck

    real = ck.resolve
    monkeypatch.setattr(ck, "resolve", lambda src: seen.append(str(src)) or real(path))


def test_pretrained_true_builds_the_row_preprocessing_and_loads_the_hub_file(monkeypatch):
    """The hub file is replaced by the tiny timm BEiT fixture: the row picks the file, the file's shapes the
    architecture, and the row the preprocessing."""
    seen: list[str] = []
    _local(monkeypatch, FIX / "beit" / "timm_beit.safetensors", seen)
    m = vitlab.create_model("beit_base_patch16_224.in22k_ft_in22k_in1k", pretrained=True)
    assert seen == ["hf-hub:timm/beit_base_patch16_224.in22k_ft_in22k_in1k"]
    ref = vitlab.create_model("beit_base_patch16_224", pretrained=FIX / "beit" / "timm_beit.safetensors")
    for (k, a), (_, b) in zip(m.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    pre = m.preprocessing
    assert pre.mean == (0.5, 0.5, 0.5) and pre.crop_pct == 0.9 and pre.input_size == (3, 224, 224)


def test_pretrained_true_at_the_weights_own_resolution(monkeypatch):
    """mobilevitv2_150's ImageNet-22k weights were fine-tuned at 384 px: the model is built for 384."""
    row = find_weights("mobilevitv2_150", "cvnets_in22k_ft_in1k_384")
    assert row.input_size == (3, 384, 384)
    _local(monkeypatch, FIX / "mobilevit" / "timm_v2" / "model.safetensors", [])
    m = vitlab.create_model("mobilevitv2_150.cvnets_in22k_ft_in1k_384", pretrained=True)
    assert m.preprocessing.input_size == (3, 384, 384)
    assert vitlab.create_model("mobilevitv2_150", pretrained=FIX / "mobilevit" / "timm_v2" / "model.safetensors"
                               ).preprocessing.input_size == (3, 256, 256)


# registered names whose default preprocessing differs from their default row, and why (pretrained=True applies
# the row; a file loaded from disk gets the model's defaults)
DEFAULT_ROW_EXCEPTIONS = {
    # generated from ViT's variants table with the family's statistics (0.5); its only published weights are
    # DINO's self-supervised backbone, trained with ImageNet's
    "vit_small_patch8_224": {"mean", "std"},
}
WITH_ROWS = sorted({r["model"] for r in ROWS})


def _preprocessing_fields(pre) -> dict:
    return {"input_size": tuple(pre.input_size), "mean": tuple(pre.mean), "std": tuple(pre.std),
            "crop_pct": pre.crop_pct, "interpolation": pre.interpolation, "crop_mode": pre.crop_mode}


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
@pytest.mark.parametrize("name", WITH_ROWS)
def test_default_preprocessing_is_the_default_rows(name):
    """The same weights get the same eval preprocessing whether loaded by ``pretrained=True`` (the row) or from a
    file on disk (the model's defaults): DeiT's 224px crop 0.9, the MIIL ViT's bilinear resize (timm's configs)."""
    row = find_weights(name)
    with torch.device("meta"):
        model = vitlab.create_model(name)
    got = _preprocessing_fields(model.preprocessing)
    want = _preprocessing_fields(row)
    differ = {k for k in got if got[k] != (want[k] if isinstance(want[k], str) else pytest.approx(want[k]))}
    assert differ == DEFAULT_ROW_EXCEPTIONS.get(name, set()), (row.tag, {k: (got[k], want[k]) for k in differ})


# ------------------------------------------------------------------ every published timm file's layout
def _published_layouts() -> list[tuple[dict, dict[str, list[int]]]]:
    """One row per (model, layout, input size) of fixtures/timm_pretrained_shapes.json.gz: the key names and
    shapes of the weight files the table lists, as timm builds them (make_fixtures_timm_pretrained_shapes.py)."""
    with gzip.open(FIX / "timm_pretrained_shapes.json.gz", "rt") as f:
        data = json.load(f)
    by_key = {(r["model"], r["tag"]): r for r in ROWS}
    seen, out = set(), []
    for r in data["rows"]:
        row = by_key[(r["model"], r["tag"])]
        key = (r["model"], r["layout"], tuple(row["input_size"]))
        if key not in seen:
            seen.add(key)
            out.append((row, data["layouts"][r["layout"]]))
    return out


PUBLISHED = _published_layouts()


def _build_published(monkeypatch, name: str, layout: dict[str, list[int]]):
    """``create_model(name, pretrained=True)`` on the meta device, the hub file replaced by one with ``layout``."""
    import vitlab.checkpoints as ck
    import vitlab.checkpoints.load as load

    # layer-scale vectors are read by value (BEiT's converter sets init_values from them): real, small
    sd = {k: torch.full(shape, 0.1) if "gamma" in k else torch.empty(shape, device="meta")
          for k, shape in layout.items()}
    monkeypatch.setattr(ck, "resolve", lambda src: Path("published.safetensors"))
    monkeypatch.setattr(load, "read_vitlab", lambda path: None)
    monkeypatch.setattr(load, "read_safetensors", lambda path: (dict(sd), {}))
    with torch.device("meta"):
        return vitlab.create_model(name, pretrained=True)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_pretrained_true_applies_the_rows_crop_mode(monkeypatch):
    """vit_medium_patch16_gap_384's weights are evaluated with timm's crop_mode="squash" (both sides resized);
    no config field holds it: the name squashes as timm's pretrained_cfg for it does, and a row of the same
    name that crops the centre (vit_large_patch14_clip_336.openai among its squashed rows) sets that."""
    row, layout = next((r, lay) for r, lay in PUBLISHED if r["model"] == "vit_medium_patch16_gap_384")
    assert row["crop_mode"] == "squash" and find_weights("vit_medium_patch16_gap_384").crop_mode == "squash"
    m = _build_published(monkeypatch, "vit_medium_patch16_gap_384", layout)
    assert m.preprocessing.crop_mode == "squash"
    assert m.preprocessing_style["crop_mode"] == "squash"  # recorded: a saved checkpoint keeps it
    with torch.device("meta"):
        assert vitlab.create_model("vit_medium_patch16_gap_384").preprocessing.crop_mode == "squash"
        assert vitlab.create_model("vit_large_patch14_clip_336").preprocessing.crop_mode == "squash"
        assert vitlab.create_model("vit_large_patch14_clip_224").preprocessing.crop_mode == "center"
        assert vitlab.create_model("vit_medium_patch16_gap_384", crop_mode="center").preprocessing.crop_mode \
            == "center"
    openai = find_weights("vit_large_patch14_clip_336", "openai")
    assert openai.crop_mode == "center"
    _, layout = next((r, lay) for r, lay in PUBLISHED if (r["model"], r["tag"]) ==
                     ("vit_large_patch14_clip_336", "openai"))
    m = _build_published(monkeypatch, "vit_large_patch14_clip_336.openai", layout)
    assert m.preprocessing.crop_mode == "center" and m.preprocessing_style["crop_mode"] == "center"


def test_a_vitlab_file_keeps_the_crop_it_was_written_with(tmp_path):
    """A vitlab file of a name that squashes keeps its recorded crop mode: squashed when written with the
    name's style, centre-cropped when written before the name had one (its preprocessing says centre, no
    style recorded)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vitlab.checkpoints.vitlab_format import save_model

    small = dict(embed_dim=32, depth=1, num_heads=2, img_size=32)
    m = vitlab.create_model("vit_medium_patch16_gap_384", **small)
    assert m.preprocessing.crop_mode == "squash"
    save_model(m, tmp_path / "now.safetensors")
    assert vitlab.load_model(tmp_path / "now.safetensors").preprocessing.crop_mode == "squash"
    with safe_open(str(tmp_path / "now.safetensors"), "pt") as f:
        meta, sd = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    vitlab_meta = json.loads(meta["vitlab"])
    assert vitlab_meta["preprocessing"]["crop_mode"] == "squash"
    vitlab_meta.pop("preprocessing_style")
    vitlab_meta["preprocessing"]["crop_mode"] = "center"  # as a vitlab without the name's style wrote it
    save_file(sd, str(tmp_path / "before.safetensors"), metadata={**meta, "vitlab": json.dumps(vitlab_meta)})
    assert vitlab.load_model(tmp_path / "before.safetensors").preprocessing.crop_mode == "center"


def test_the_layout_fixture_covers_every_timm_row():
    with gzip.open(FIX / "timm_pretrained_shapes.json.gz", "rt") as f:
        covered = {(r["model"], r["tag"]) for r in json.load(f)["rows"]}
    assert covered == {(r["model"], r["tag"]) for r in ROWS if r["format"] == "timm"}


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
@pytest.mark.parametrize("row, layout", PUBLISHED, ids=[f"{r['model']}.{r['tag']}" for r, _ in PUBLISHED])
def test_every_published_timm_file_fits_the_model_its_row_builds(monkeypatch, row, layout):
    """``create_model("model.tag", pretrained=True)`` on a file with the published keys and shapes: format
    detection, the family's converter and the strict load accept it (on the meta device: no memory, no
    download); the model has the row's classes and input size. Numerical parity per family is tested on the
    tiny fixtures; this covers every size and variant the hub holds."""
    m = _build_published(monkeypatch, f"{row['model']}.{row['tag']}", layout)
    assert m.num_classes == row["num_classes"]
    pre = m.preprocessing
    assert tuple(pre.input_size) == tuple(row["input_size"])
    # the preprocessing the weights were trained with, also where the family fixes it (the miil ViT's bilinear)
    assert (pre.interpolation, pre.crop_pct) == (row["interpolation"], pytest.approx(row["crop_pct"]))
    assert pre.mean == pytest.approx(tuple(row["mean"])) and pre.std == pytest.approx(tuple(row["std"]))
    assert pre.crop_mode == row["crop_mode"]


def test_list_models_pretrained_lists_every_set_of_weights(capsys):
    from vitlab.cli.main import main
    from vitlab.models.pretrained import _table, find_weights

    tagged = list_models(pretrained=True, task=None)
    assert len(tagged) == len(set(tagged)) == len(_table())  # every row, once
    for t in tagged:
        name, tag = t.split(".", 1)
        assert find_weights(name, tag).model == name
    names = list_models("swin_*", pretrained=True, include_tags=False)
    assert names and set(names) == {t.split(".")[0] for t in list_models("swin_*", pretrained=True)}
    assert "swin_tiny_patch4_window7_224.ms_in1k" in list_models("swin_*", pretrained=True)
    assert main(["models", "swin_tiny*", "--pretrained"]) == 0
    out = capsys.readouterr().out
    assert "swin_tiny_patch4_window7_224.ms_in22k_ft_in1k" in out and "Swin-T" in out
