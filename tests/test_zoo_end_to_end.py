"""Each new family as a user meets it: the Python API round trip, then `vitlab train` on the bundled digits
(the digits recipe's ViT options are not applied to another family; the family's own are set with --set),
eval, predict, explain (which method), analyze (what applies), fewshot and finetune to other classes and
another size. Tiny models, a couple of steps each; one trained checkpoint per family, shared."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import vitlab
from test_cli_train import write_digit_pngs
from vitlab.checkpoints.io import CheckpointError
from vitlab.cli.main import main

torch.set_num_threads(1)

STEPS = ["--steps", "2", "--batch-size", "32", "--no-progress"]


def sets(**kw) -> list[str]:
    return [a for k, v in kw.items() for a in ("--set", f"model_overrides.{k}={json.dumps(v)}")]


# name, img size for digits, tiny options (CLI --set), finetune size (None: fixed size, must be refused)
FAMILIES = {
    "crossvit": ("crossvit_tiny_240", 48, dict(embed_dim=[16, 32], depth=[[1, 1]], num_heads=[2, 2]), 72),
    "tnt": ("tnt_s_patch16_224", 32, dict(embed_dim=32, inner_dim=8, depth=1, num_heads_outer=2,
                                          num_heads_inner=2), 48),
    "t2t": ("t2t_vit_7", 32, dict(token_dim=16, embed_dim=32, depth=1, num_heads=2), 48),
    "mixer": ("mixer_s16_224", 32, dict(embed_dim=32, depth=1), None),
    "xcit": ("xcit_nano_12_p16_224", 32, dict(embed_dim=32, depth=1, num_heads=4), 48),
    "linformer": ("vit_tiny_patch16_224", 8, dict(attn_type="linformer", embed_dim=32, depth=1, num_heads=2,
                                                  patch_size=2), 16),
    "cct": ("cct_7_3x1_32", 16, dict(embed_dim=32, depth=1, num_heads=2), 24),
}
# what `vitlab explain` picks by default: rollout where tokens attend to tokens of one sequence (or the
# family's own rollout), Grad-CAM otherwise
AUTO_METHOD = {"crossvit": "rollout", "tnt": "rollout", "t2t": "rollout", "mixer": "grad-cam",
               "xcit": "grad-cam", "linformer": "grad-cam", "cct": "rollout"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_digit_pngs(tmp_path_factory.mktemp("pngs"), classes=(0, 1, 2), per_class=6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """family -> checkpoint of a 2-step digits run, trained on first use."""
    done: dict[str, object] = {}

    def get(family: str):
        if family not in done:
            name, size, tiny, _ = FAMILIES[family]
            out = tmp_path_factory.mktemp(f"run-{family}")
            assert main(["train", "--model", name, "--data", "digits", "--img-size", str(size), "--output",
                         str(out), *STEPS, *sets(**tiny)]) == 0
            done[family] = out / "model.safetensors"
        return done[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_api_save_load_same_logits(family, tmp_path):
    name, size, tiny, _ = FAMILIES[family]
    tiny = {k: tuple(map(tuple, v)) if k == "depth" and family == "crossvit" else v for k, v in tiny.items()}
    model = vitlab.create_model(name, num_classes=5, img_size=size, **tiny).eval()
    vitlab.save_model(model, tmp_path / "m.safetensors")
    again = vitlab.load_model(tmp_path / "m.safetensors").eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_train_eval_predict_explain(family, trained, images, tmp_path, capsys, caplog):
    ckpt = trained(family)
    assert json.loads((ckpt.parent / "recipe.json").read_text())["model_overrides"].get("patch_size") in (None, 2)
    assert main(["eval", "--checkpoint", str(ckpt), "--data", "digits", "--output", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] > 300
    files, _ = images
    assert main(["predict", files[0], "--checkpoint", str(ckpt), "--topk", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["predictions"]) == 2
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["explain", files[0], "--checkpoint", str(ckpt), "--output", str(tmp_path / "ex")]) == 0
    method = AUTO_METHOD[family]
    assert f"method {method} chosen by --method auto" in caplog.text
    assert (tmp_path / "ex" / f"{files[0].rsplit('/', 1)[1][:-4]}_{method}.png").is_file()
    assert main(["explain", files[0], "--checkpoint", str(ckpt), "--method", "grad-input",
                 "--output", str(tmp_path / "ex")]) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_analyze_says_what_applies(family, trained, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="vitlab"):
        assert main(["analyze", "--checkpoint", str(trained(family)), "--data", "digits", "--num-images", "4",
                     "--output", str(tmp_path)]) == 0
    numbers = json.loads((tmp_path / "analysis.json").read_text())
    for key, text in (("attention_distance", "mean attention distance"), ("position_similarity", "position similarity"),
                      ("embedding_filters", "embedding filters")):
        if numbers[key] is None:  # each analysis either reports its numbers or says why it does not apply
            assert f"{text} does not apply" in caplog.text or f"{text} do not apply" in caplog.text
        else:
            assert text in caplog.text
    applies = {k for k in ("attention_distance", "position_similarity") if numbers[k] is not None}
    expected = {"crossvit": {"attention_distance", "position_similarity"},
                "tnt": {"attention_distance", "position_similarity"},
                "t2t": {"attention_distance", "position_similarity"},
                "mixer": set(), "xcit": set(), "linformer": {"position_similarity"},
                "cct": {"attention_distance", "position_similarity"}}[family]
    assert applies == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_fewshot(family, trained, capsys):
    assert main(["fewshot", "--checkpoint", str(trained(family)), "--data", "digits", "--shots", "1",
                 "--seeds", "1", "--pool", "4", "--max-test", "20", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == FAMILIES[family][0] and out["num_test"] == 20
    assert 0.0 <= out["results"][0]["linear_mean"] <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_finetune_other_classes_and_size(family, trained, images, tmp_path, capsys):
    files, _ = images
    folder = files[0].rsplit("/", 2)[0]  # class sub-folders 0, 1, 2
    _, _, _, size = FAMILIES[family]
    args = ["finetune", "--from", str(trained(family)), "--data", folder, "--output", str(tmp_path / "ft"),
            "--set", "global_batch=4", "--set", "warmup_steps=0", *STEPS[:2], "--batch-size", "4", "--no-progress"]
    if size is None:  # MLP-Mixer's token-mixing MLPs are tied to the number of patches
        assert main([*args, "--img-size", "48"]) == 2
        with pytest.raises((ValueError, CheckpointError), match="token-mixing"):
            vitlab.create_model("mixer_s16_224", pretrained=str(trained(family)), img_size=48)
        return
    assert main([*args, "--img-size", str(size)]) == 0
    model = vitlab.load_model(tmp_path / "ft" / "model.safetensors").eval()
    assert model.num_classes == 3
    with torch.no_grad():
        assert model(torch.randn(1, 1, size, size)).shape == (1, 3)  # digits: one channel


FOREIGN = {"crossvit": "xcit", "tnt": "t2t", "t2t": "tnt", "mixer": "crossvit", "xcit": "mixer", "linformer": "tnt",
           "cct": "t2t"}


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_of_another_family_is_refused_clearly(family, trained):
    """Weights of another family given as pretrained: one error naming the mismatch, not a KeyError."""
    name, size, tiny, _ = FAMILIES[family]
    other = trained(FOREIGN[family])
    with pytest.raises((CheckpointError, ValueError)) as e:
        vitlab.create_model(name, pretrained=str(other), img_size=size)
    assert not isinstance(e.value, KeyError)
    assert FOREIGN[family] in str(e.value) or FAMILIES[FOREIGN[family]][0] in str(e.value)


def test_mixer_wrong_input_size_is_a_clear_error():
    model = vitlab.create_model("mixer_s16_224", embed_dim=32, depth=1, img_size=32)
    with pytest.raises(ValueError, match="32"):
        model(torch.randn(1, 3, 48, 48))


FIXTURES = {"crossvit": "crossvit_timm_tiny.safetensors", "tnt": "tnt_timm_tiny.safetensors",
            "t2t": "t2t_vit_official_tiny.pth.tar", "mixer": "mixer_timm_tiny.safetensors",
            "xcit": "xcit_timm_tiny_p16.safetensors", "cct": "cct_official_learn.pth"}


@pytest.mark.parametrize(("family", "other"), [(f, o) for f in FIXTURES for o in FIXTURES if f != o])
def test_foreign_state_dict_is_refused_clearly(family, other):
    """A timm/official state dict of another family: a CheckpointError that says it is not this family's."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / FIXTURES[other]
    with pytest.raises(CheckpointError, match="not an? .*(checkpoint|state dict)|no converter"):
        vitlab.create_model(FAMILIES[family][0], pretrained=str(path))


def test_recipe_model_options_follow_the_family(caplog):
    """The digits recipe's ViT options reach ViT-like configs (DeiT, CaiT) whole; for the new families only
    the options that carry over (drop rates, crop_pct) remain, and the log says which were not applied."""
    from vitlab.train.recipe import load_recipe

    recipe = load_recipe("digits")
    for name in ("vit_small_patch16_224", "deit_tiny_patch16_224", "cait_xxs24_224"):
        assert recipe.for_model(name).model_overrides == recipe.model_overrides
    with caplog.at_level(logging.INFO, logger="vitlab"):
        for family in ("crossvit", "tnt", "t2t", "mixer", "xcit", "cct"):
            assert recipe.for_model(FAMILIES[family][0]).model_overrides == {"drop_path_rate": 0.1}
    assert "not applied to xcit_nano_12_p16_224 (family xcit)" in caplog.text
