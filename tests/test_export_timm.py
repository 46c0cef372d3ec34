"""vitlab models in timm's layout (vitlab.checkpoints.to_timm, ``vitlab export --format timm``).

timm's key sets, shapes and the timm model for each tiny case come from tests/fixtures/timm_layout/keys.json (made
with timm by make_keys.py beside it); the round trip goes through vitlab's own timm converters, which other tests
check against timm's outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vitlab
from vitlab.checkpoints import save_timm, timm_model_args, to_timm_state_dict
from vitlab.checkpoints.converters import get_converter
from vitlab.cli.main import main
from vitlab.models import get_entry

from model_helpers import perturb_

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "timm_layout" / "keys.json").read_text())
CASES = FIXTURE["cases"]


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _overrides(case: dict) -> dict:
    return {k: _tuples(v) for k, v in case["vitlab_overrides"].items()}


def _tiny(case: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vitlab.create_model(case["vitlab_model"], **_overrides(case))
    perturb_(model, std=0.02)
    with torch.no_grad():  # batch-norm statistics away from (0, 1), so that a swapped buffer shows
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.add_(0.1)
            elif name.endswith("running_var"):
                buf.mul_(1.3)
    return model.eval()


def _input(model: torch.nn.Module) -> torch.Tensor:
    c, h, w = model.preprocessing.input_size
    return torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_timm_layout_keys_and_model(case_id):
    """The exported tensors are exactly timm's (names and shapes) for the timm model the export names."""
    case = CASES[case_id]
    with torch.device("meta"):
        model = vitlab.create_model(case["vitlab_model"], **_overrides(case))
    args = timm_model_args(model)
    assert (args.builder, args.model_name) == (case["timm_builder"], case["timm_model"])
    assert args.kwargs == case["timm_kwargs"]
    got = {k: list(v.shape) for k, v in to_timm_state_dict(model).items()}
    assert sorted(set(got) - set(case["keys"])) == [] and sorted(set(case["keys"]) - set(got)) == []
    assert got == case["keys"]


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_timm_layout_round_trip(tmp_path, case_id):
    """The exported file, read back by vitlab's own timm converter, is the same model: the converter gives back
    every tensor exactly (the export is its inverse) and the outputs are equal."""
    case = CASES[case_id]
    model = _tiny(case)
    family = get_entry(case["vitlab_model"]).family
    ref = model.state_dict()
    back = get_converter(family, "timm")(to_timm_state_dict(model), {}).state_dict
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)

    path = tmp_path / "model.safetensors"
    save_timm(model, path)
    again = vitlab.create_model(case["vitlab_model"], pretrained=str(path), **_overrides(case)).eval()
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "beit3_base_patch16_224"])
def test_timm_layout_is_identity_where_vitlab_uses_timm_names(name):
    model = perturb_(vitlab.create_model(name, img_size=32, embed_dim=32, depth=2, num_heads=4, num_classes=5))
    sd = model.state_dict()
    out = to_timm_state_dict(model)
    assert list(out) == list(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_renamings_are_the_documented_ones():
    """Spot checks of each family's names (the full key sets are in the fixture)."""
    cases = {
        "cait": ("blocks_token_only.0.gamma_2", "blocks_token_only.0.ls2.gamma"),
        "beit": ("blocks.1.gamma_1", "blocks.1.ls1.gamma"),
        "xcit": ("cls_attn_blocks.1.gamma2", "cls_attn_blocks.1.ls2.gamma"),
        "swin": ("head.fc.weight", "head.weight"),
        "mobilevit": ("head.fc.bias", "head.bias"),
        "crossvit": ("blocks.0.fusion.1.attn.wk.weight", "blocks.0.fusion.1.attn.k.weight"),
        "mixer": ("stem.proj.weight", "patch_embed.proj.weight"),
        "tnt": ("blocks.0.attn_out.qk.weight", "blocks.0.attn_out.qkv.weight"),
    }
    for case_id, (timm_key, vitlab_key) in cases.items():
        keys = CASES[case_id]["keys"]
        assert timm_key in keys and vitlab_key not in keys
    crossvit = CASES["crossvit"]["keys"]
    assert {"cls_token_0", "pos_embed_1"} <= set(crossvit) and "cls_token.0" not in crossvit


def test_tnt_split_takes_q_k_rows_then_v():
    model = _tiny(CASES["tnt_legacy_bias"])
    sd, out = model.state_dict(), to_timm_state_dict(model)
    for part in ("attn_in", "attn_out"):
        for kind in ("weight", "bias"):
            qkv = sd[f"blocks.1.{part}.qkv.{kind}"]
            d = qkv.shape[0] // 3
            assert torch.equal(out[f"blocks.1.{part}.qk.{kind}"], qkv[:2 * d])
            assert torch.equal(out[f"blocks.1.{part}.v.{kind}"], qkv[2 * d:])


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name, overrides, words", [
    ("t2t_vit_7", {}, ["T2T-ViT", "timm has no T2T-ViT", "--format onnx"]),
    ("cct_7_3x1_32", {}, ["CCT", "timm has no CCT"]),
    ("mobilevitv3_xxs", {}, ["MobileViT v3", "timm has MobileViT v1 and v2 only"]),
    ("detr_resnet50", {}, ["DETR", "no detection models"]),
    ("setr_naive_vit_small_patch16", {}, ["SETR", "no segmentation models"]),
    ("vit_small_patch16_224", {"attn_type": "linformer"}, ["Linformer", "attn_type='linformer'"]),
])
def test_families_without_a_timm_model_are_refused(name, overrides, words):
    with torch.device("meta"):
        model = vitlab.create_model(name, **overrides)
    for fn in (timm_model_args, to_timm_state_dict):
        with pytest.raises(ValueError) as e:
            fn(model)
        assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("name, overrides, words", [
    ("vit_small_patch16_224", {"norm_eps": 1e-5}, ["norm_eps=1e-05", "has 1e-06", "VisionTransformer"]),
    ("vit_small_patch16_224", {"pos_embed": "sincos"}, ["pos_embed='sincos'", "sin-cos"]),
    ("vit_base_r50_s16_224", {"hybrid_layers": (1, 1, 1)}, ["hybrid_layers=(1, 1, 1)", "(3, 4, 9)"]),
    ("swin_tiny_patch4_window7_224", {"pad_before_shift": True}, ["pad_before_shift=True", "Hugging Face"]),
    ("beit_base_patch16_224", {"sub_ln": True}, ["sub_ln=True"]),
    ("beit_base_patch16_224", {"fc_norm": True, "final_norm": True}, ["final_norm=True", "both"]),
    ("beit3_base_patch16_224", {"use_rel_pos_bias": True}, ["use_rel_pos_bias=True", "relative position"]),
    ("crossvit_tiny_240", {"depth": ((2, 1),)}, ["depth=((2, 1),)", "small branch"]),
    ("tnt_s_patch16_224", {"inner_mlp_ratio": 2.0}, ["inner_mlp_ratio=2.0", "TNT"]),
    ("mixer_s32_224", {"gelu": "tanh"}, ["gelu='tanh'", "exact GELU"]),
    ("mobilevit_xxs", {"expand_ratio": 4.0}, ["expand_ratio=4.0", "fixed block table"]),
    ("deit_tiny_distilled_patch16_224", {"dist_head": False}, ["dist_head=False", "head_dist"]),
])
def test_options_timm_cannot_build_are_refused_by_name(name, overrides, words):
    with torch.device("meta"):
        model = vitlab.create_model(name, **overrides)
    with pytest.raises(ValueError) as e:
        timm_model_args(model)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_preprocessing_and_training_fields_are_not_model_arguments():
    with torch.device("meta"):
        model = vitlab.create_model("vit_tiny_patch16_224", mean=(0.5, 0.5, 0.5), crop_pct=1.0, drop_path_rate=0.1)
    assert timm_model_args(model).kwargs == {}


def test_mobilevit_channel_order_is_a_note():
    with torch.device("meta"):
        model = vitlab.create_model("mobilevit_xxs", channel_order="BGR")
    args = timm_model_args(model)
    assert args.kwargs == {} and any("BGR" in n for n in args.notes)


def test_saved_file_metadata(tmp_path):
    case = CASES["cait"]
    model = _tiny(case)
    path = tmp_path / "m.safetensors"
    save_timm(model, path, class_names=list("abcde"))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "timm" and "vitlab" not in meta  # not read back as a vitlab checkpoint
    assert meta["timm_model"] == case["timm_model"] and json.loads(meta["timm_kwargs"]) == case["timm_kwargs"]
    assert json.loads(meta["class_names"]) == list("abcde")
    assert json.loads(meta["preprocessing"])["input_size"] == [3, 32, 32]
    assert "timm_builder" not in meta
    mixer = _tiny(CASES["mixer"])
    save_timm(mixer, tmp_path / "mixer.safetensors")
    with safe_open(str(tmp_path / "mixer.safetensors"), "pt") as f:
        assert f.metadata()["timm_builder"] == "timm.models.mlp_mixer.MlpMixer"


def test_load_line():
    args = timm_model_args(_tiny(CASES["cait"]))
    assert args.load_line("m.safetensors") == (
        "timm.create_model('cait_xxs24_224', pretrained=False, init_values=0.1, img_size=32, num_classes=5, "
        "embed_dim=64, depth=2, depth_token_only=1).load_state_dict("
        "safetensors.torch.load_file('m.safetensors'))")
    mixer = timm_model_args(_tiny(CASES["mixer"]))
    assert mixer.load_line("x.safetensors").startswith("timm.models.mlp_mixer.MlpMixer(num_blocks=2, ")


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def cait_checkpoint(tmp_path):
    model = _tiny(CASES["cait"])
    path = tmp_path / "cait.safetensors"
    vitlab.save_model(model, path, class_names=list("abcde"))
    return path


def test_cli_export_timm_writes_the_file_and_the_load_line(tmp_path, cait_checkpoint, capsys):
    out = tmp_path / "timm.safetensors"
    assert main(["export", "--checkpoint", str(cait_checkpoint), "--format", "timm", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "model = timm.create_model('cait_xxs24_224', pretrained=False, init_values=0.1, img_size=32" in printed
    assert f"model.load_state_dict(safetensors.torch.load_file({str(out)!r}))" in printed
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == list("abcde")
    model = vitlab.load_model(cait_checkpoint)
    again = vitlab.create_model("cait_xxs24_224", pretrained=str(out), **_overrides(CASES["cait"])).eval()
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))

    assert main(["export", "--checkpoint", str(cait_checkpoint), "--format", "timm", "--output", str(out),
                 "--overwrite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["timm_model"] == "cait_xxs24_224" and report["timm_kwargs"] == CASES["cait"]["timm_kwargs"]
    assert report["load"].endswith(f".load_state_dict(safetensors.torch.load_file({str(out)!r}))")


def test_cli_export_timm_refuses_a_family_timm_lacks(tmp_path, caplog):
    out = tmp_path / "t2t.safetensors"
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(["export", "--model", "t2t_vit_7", "--model-arg", "depth=1", "--format", "timm",
                     "--output", str(out)]) == 2
    assert "t2t_vit_7 is a T2T-ViT model: timm has no T2T-ViT model" in caplog.text
    assert not out.exists()


def test_cli_export_timm_never_replaces_a_file_unasked(tmp_path, cait_checkpoint, caplog):
    out = tmp_path / "timm.safetensors"
    out.write_bytes(b"the user's earlier export")
    args = ["export", "--checkpoint", str(cait_checkpoint), "--format", "timm", "--output", str(out)]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(args) == 2
    assert "timm.safetensors exists; pass --overwrite to replace it" in caplog.text
    assert out.read_bytes() == b"the user's earlier export"
    assert main([*args, "--overwrite"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["format"] == "timm"


def test_cli_export_timm_refuses_onnx_options_and_other_suffixes(tmp_path, cait_checkpoint, caplog):
    base = ["export", "--checkpoint", str(cait_checkpoint), "--format", "timm"]
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main([*base, "--output", str(tmp_path / "m.safetensors"), "--int8", "--img-size", "64"]) == 2
        assert main([*base, "--output", str(tmp_path / "m.onnx")]) == 2
    assert "--img-size, --int8: options of the ONNX export" in caplog.text
    assert "name the file *.safetensors" in caplog.text
    assert not list(tmp_path.glob("m.*"))


# ------------------------------------------------------------------------------------- timm hub folder
HUB = json.loads((Path(__file__).parent / "fixtures" / "timm_layout" / "hub_configs.json").read_text())


def _hub_model(case_id: str, *, meta: bool = False) -> torch.nn.Module:
    """The case's tiny model with the preprocessing the fixture's save_for_hf was given."""
    from vitlab.models.base import set_preprocessing_style

    if meta:
        with torch.device("meta"):
            model = vitlab.create_model(CASES[case_id]["vitlab_model"], **_overrides(CASES[case_id]))
    else:
        model = _tiny(CASES[case_id])
    set_preprocessing_style(model, **HUB["data"])
    return model


@pytest.mark.parametrize("case_id", sorted(HUB["cases"]))
def test_timm_hub_config_is_what_timm_save_for_hf_writes(case_id):
    """config.json has timm's own fields and values (hub_configs.json: timm's save_for_hf for the same model)."""
    from vitlab.checkpoints import timm_hub_config

    timm_cfg = HUB["cases"][case_id]
    got = timm_hub_config(_hub_model(case_id, meta=True), class_names=HUB["labels"])
    for key in ("architecture", "num_classes", "num_features", "global_pool", "label_names"):
        assert got[key] == timm_cfg[key], key
    for key in ("input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
                "num_classes", "first_conv", "classifier", "custom_load"):
        assert got["pretrained_cfg"][key] == pytest.approx(timm_cfg["pretrained_cfg"][key]), key
    # the create_model arguments beyond the name's defaults; num_classes is the top-level entry (transformers'
    # TimmWrapper passes num_classes itself: a second one in model_args is a TypeError)
    expected = {k: v for k, v in CASES[case_id]["timm_kwargs"].items() if k != "num_classes"}
    assert got.get("model_args", {}) == expected
    for key, value in expected.items():  # what timm records for them (it records every argument)
        recorded = timm_cfg["model_args"][key]
        assert recorded == value or (key == "img_size" and recorded == [value, value]), key


@pytest.mark.parametrize("case_id", ["cait", "deit_distilled", "swin", "beit", "beit_token_pool", "mobilevit", "xcit",
                                     "crossvit", "crossvit_18", "crossvit_dagger", "mixer_ratios"])
def test_timm_folder_loads_back_in_vitlab(tmp_path, case_id):
    """vitlab reads the folder as a timm hub folder: the same outputs, class names and preprocessing."""
    from vitlab.checkpoints import save_timm_folder

    model = _hub_model(case_id).eval()
    folder = tmp_path / "export"
    args = save_timm_folder(model, folder, class_names=HUB["labels"])
    assert args.model_name == CASES[case_id]["timm_model"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}  # transformers loads only "pt" safetensors files
        assert sorted(f.keys()) == sorted(CASES[case_id]["keys"])
    again = vitlab.load_model(folder).eval()
    assert again.class_names == HUB["labels"]
    assert again.preprocessing == model.preprocessing
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_timm_folder_refuses_what_create_model_cannot_build_by_name(tmp_path):
    from vitlab.checkpoints import save_timm_folder

    with pytest.raises(ValueError, match=r"timm.models.mlp_mixer.MlpMixer\(...\), not by a registered name.*"
                                         r"export a .safetensors file"):
        save_timm_folder(_tiny(CASES["mixer"]), tmp_path / "mixer")
    assert list(tmp_path.iterdir()) == []


def test_timm_folder_is_written_atomically_and_never_replaced_unasked(tmp_path, monkeypatch):
    from vitlab.checkpoints import save_timm_folder

    model = _tiny(CASES["cait"])
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("the user's model card")
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"export is a folder that is not empty \(README.md, config.json\); pass "
                                         r"overwrite=True"):
        save_timm_folder(model, folder)
    assert (folder / "config.json").read_text() == "{}" and not (folder / "model.safetensors").exists()
    with pytest.raises(ValueError, match="exists and is not a folder"):
        save_timm_folder(model, folder / "README.md")

    # a writer that fails leaves the folder as it was and no temporary folder
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_timm_folder(model, folder, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_timm_folder(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (folder / "config.json").read_text() == "{}"
    monkeypatch.undo()

    save_timm_folder(model, folder, overwrite=True)  # replaces the two files, keeps the model card
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert json.loads((folder / "config.json").read_text())["architecture"] == "cait_xxs24_224"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    empty = tmp_path / "empty"
    empty.mkdir()
    save_timm_folder(model, empty)  # an empty folder is no refusal
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]


def test_cli_export_timm_folder(tmp_path, cait_checkpoint, capsys, caplog):
    out = tmp_path / "cait-timm"
    base = ["export", "--checkpoint", str(cait_checkpoint), "--format", "timm", "--output", str(out)]
    assert main(base) == 0
    printed = capsys.readouterr().out
    assert f"model = timm.create_model('local-dir:{out}', pretrained=True)" in printed
    assert f"model = AutoModelForImageClassification.from_pretrained({str(out)!r})" in printed
    assert f"processor = AutoImageProcessor.from_pretrained({str(out)!r})" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == list("abcde") and config["architecture"] == "cait_xxs24_224"
    model = vitlab.load_model(cait_checkpoint).eval()
    again = vitlab.load_model(out).eval()
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))

    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert main(base) == 2
    assert "cait-timm is a folder that is not empty; pass --overwrite" in caplog.text
    assert main([*base, "--overwrite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "timm hub folder" and report["load_timm"] == f"timm.create_model('local-dir:{out}', pretrained=True)"
    assert main(["export", "--checkpoint", str(cait_checkpoint), "--format", "timm", "--output", str(tmp_path)]) == 2


def test_an_export_never_replaces_the_checkpoint_it_reads(tmp_path, cait_checkpoint, caplog):
    """--output RUN --overwrite (the run folder holding model.safetensors) replaced the run's vitlab checkpoint
    with the timm-layout weights; a file export onto its own input likewise."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "model.safetensors"
    shutil.copy(cait_checkpoint, ckpt)
    before = ckpt.read_bytes()
    for output in (run, ckpt):
        with caplog.at_level(logging.ERROR, logger="vitlab"):
            assert main(["export", "--checkpoint", str(ckpt), "--format", "timm", "--output", str(output),
                         "--overwrite"]) == 2
        assert "which the checkpoint being exported" in caplog.text
        caplog.clear()
    assert ckpt.read_bytes() == before and sorted(p.name for p in run.iterdir()) == ["model.safetensors"]
    vitlab.load_model(ckpt)  # still the vitlab checkpoint
