"""Hub weights named the way timm and Hugging Face users name them: ``hf-hub:ORG/NAME`` of a repo that
models/pretrained.json lists (the row's preprocessing when the repo's files do not state it), timm's ``hf_hub:``
and ``@REVISION`` spellings, a hub repo as the model name, ``NAME.TAG`` on the command line, and a PyTorch
Lightning checkpoint's ``model.`` prefix. Hub caches are built in tmp_path in huggingface_hub's on-disk layout;
the hub is never contacted (HF_HUB_OFFLINE)."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab.checkpoints import CheckpointError
from vitlab.models.pretrained import find_weights

from model_helpers import perturb_

pytest.importorskip("huggingface_hub")

FIX = Path(__file__).resolve().parent / "fixtures"
TINY = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, num_classes=3)
PRE_FIELDS = ("input_size", "mean", "std", "crop_pct", "interpolation", "crop_mode")
# what ViTImageProcessor().save_pretrained writes (transformers 5.x): resize to 224 x 224, no crop
VIT_PROCESSOR = {"do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                 "image_processor_type": "ViTImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 2,
                 "rescale_factor": 1 / 255, "size": {"height": 224, "width": 224}}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline hub cache (huggingface_hub reads its settings at import: they are set there too)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _put(cache: Path, repo: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """``files`` as huggingface_hub caches a download of ``repo`` at ``revision``:
    models--ORG--NAME/{blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<revision>}."""
    base = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    snap = base / "snapshots" / commit
    for d in (base / "blobs", base / "refs", snap):
        d.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = base / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    (base / "refs" / revision).write_text(commit)
    return snap


def _weights(model: torch.nn.Module, tmp_path: Path, name: str = "w.safetensors") -> bytes:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.read_bytes()


def _pre(model: torch.nn.Module) -> dict:
    d = model.preprocessing.to_dict()
    return {k: tuple(d[k]) if isinstance(d[k], (list, tuple)) else d[k] for k in PRE_FIELDS}


def _row_pre(row) -> dict:
    return {k: tuple(getattr(row, k)) if k in ("input_size", "mean", "std") else getattr(row, k) for k in PRE_FIELDS}


# ------------------------------------------------------------------ 1. a listed repo gets its row's preprocessing
def _timm_layout(name: str, tag: str) -> dict[str, list[int]]:
    """Keys and shapes of the published timm file (fixtures/timm_pretrained_shapes.json.gz)."""
    with gzip.open(FIX / "timm_pretrained_shapes.json.gz", "rt") as f:
        data = json.load(f)
    row = next(r for r in data["rows"] if (r["model"], r["tag"]) == (name, tag))
    return data["layouts"][row["layout"]]


def _hf_case(name: str) -> dict:
    with gzip.open(FIX / "hf_real_layouts.json.gz", "rt") as f:
        return next(c for c in json.load(f)["cases"] if c["name"] == name)


def _published_tensors(monkeypatch: pytest.MonkeyPatch, layout: dict[str, list[int]]) -> None:
    """Every safetensors file reads as ``layout`` on the meta device (a full-size model without its memory)."""
    import vitlab.checkpoints.load as load

    sd = {k: torch.full(shape, 0.1) if "gamma" in k else torch.empty(shape, device="meta")
          for k, shape in layout.items()}
    monkeypatch.setattr(load, "read_vitlab", lambda path: None)
    monkeypatch.setattr(load, "read_safetensors", lambda path: (dict(sd), {}))


# (model.tag, files of the cache besides the weights, the layout fixture): a timm.create_model(..., pretrained=True)
# cache holds model.safetensors alone; ViTForImageClassification.from_pretrained's config.json and the weights
ROWS = [
    ("mixer_b16_224.miil_in21k_ft_in1k", {}, "timm"),
    ("vit_small_patch16_224.dino", {}, "timm"),
    ("mobilevitv2_150.cvnets_in22k_ft_in1k_384", {}, "timm"),
    ("vit_base_patch16_224.google", {"config.json": "vit_base"}, "hf"),
]


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
@pytest.mark.parametrize(("full", "side", "kind"), ROWS, ids=[r[0] for r in ROWS])
def test_a_weights_only_cache_of_a_listed_repo_gets_the_rows_preprocessing(hub, monkeypatch, caplog, full, side,
                                                                           kind):
    name, tag = full.split(".")
    row = find_weights(name, tag)
    repo = row.hub.partition(":")[2]
    files = {"model.safetensors": b""}
    if kind == "hf":
        case = _hf_case(side["config.json"])
        files["config.json"] = json.dumps(case["config"]).encode()
        layout = case["layout"]
    else:
        layout = _timm_layout(name, tag)
    _put(hub, repo, files)
    _published_tensors(monkeypatch, layout)
    with torch.device("meta"), caplog.at_level(logging.WARNING):
        published = vitlab.create_model(full, pretrained=True)
        by_repo = vitlab.create_model(name, pretrained=f"hf-hub:{repo}")
        by_timm_prefix = vitlab.create_model(name, pretrained=f"hf_hub:{repo}")
        default = vitlab.create_model(name)
    assert _pre(published) == _row_pre(row)
    assert _pre(by_repo) == _pre(published) == _pre(by_timm_prefix), "same repo, same preprocessing"
    assert _pre(default) != _pre(published), "a row whose preprocessing is the family's proves nothing"
    assert getattr(by_repo, "preprocessing_style", None) == getattr(published, "preprocessing_style", None)
    assert "states no preprocessing" not in caplog.text


def test_the_row_is_found_whatever_the_case_of_the_hub_id():
    from vitlab.models.pretrained import weights_of_hub

    row = weights_of_hub("TIMM/Mixer_B16_224.MIIL_in21k_ft_in1k@main", "mixer_b16_224")
    assert row is not None and row.tag == "miil_in21k_ft_in1k"
    assert weights_of_hub("timm/mixer_b16_224.miil_in21k_ft_in1k", "vit_base_patch16_224") is None


def test_the_google_rows_resize_as_vit_image_processor_does():
    """google/vit-*'s ViTImageProcessor resizes to size x size without a crop: vitlab's crop_mode "squash" with
    crop_pct 1 (what the processor file gives too)."""
    from vitlab.checkpoints.hf_processor import processor_style
    from vitlab.models.pretrained import _table

    google = [w for w in _table() if w.hub.startswith("hf-hub:google/")]
    assert len(google) == 6
    style, notes = processor_style(VIT_PROCESSOR, (224, 224))
    assert notes == []
    for w in google:
        assert (w.crop_mode, w.crop_pct, w.interpolation) == (style["crop_mode"], style["crop_pct"],
                                                              style["interpolation"]), w.hub
        assert (w.mean, w.std) == (style["mean"], style["std"])


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_the_repos_own_files_win_over_the_row(hub, monkeypatch):
    """A full snapshot: the processor the repo ships (here with other statistics than the row's) is followed; its
    resize (squash, no crop) is the row's."""
    case = _hf_case("vit_base")
    processor = {**VIT_PROCESSOR, "image_mean": [0.25, 0.25, 0.25]}
    _put(hub, "google/vit-base-patch16-224", {"model.safetensors": b"", "config.json": json.dumps(case["config"]).encode(),
                                              "preprocessor_config.json": json.dumps(processor).encode()})
    _published_tensors(monkeypatch, case["layout"])
    with torch.device("meta"):
        m = vitlab.create_model("vit_base_patch16_224", pretrained="hf-hub:google/vit-base-patch16-224")
        published = vitlab.create_model("vit_base_patch16_224.google", pretrained=True)
    assert m.preprocessing.mean == pytest.approx((0.25, 0.25, 0.25))
    assert published.preprocessing.mean == pytest.approx((0.25, 0.25, 0.25))
    assert (m.preprocessing.crop_mode, m.preprocessing.crop_pct) == ("squash", 1.0)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_a_timm_config_of_a_listed_repo_wins_over_the_row(hub, monkeypatch):
    name, tag = "mixer_b16_224", "miil_in21k_ft_in1k"
    config = {"architecture": f"{name}.{tag}", "num_classes": 1000,
              "pretrained_cfg": {"interpolation": "bicubic", "mean": [0.1, 0.1, 0.1], "std": [1.0, 1.0, 1.0],
                                 "input_size": [3, 224, 224], "crop_pct": 0.875}}
    _put(hub, f"timm/{name}.{tag}", {"model.safetensors": b"", "config.json": json.dumps(config).encode()})
    _published_tensors(monkeypatch, _timm_layout(name, tag))
    with torch.device("meta"):
        m = vitlab.create_model(name, pretrained=f"hf-hub:timm/{name}.{tag}")
    assert m.preprocessing.interpolation == "bicubic" and m.preprocessing.mean == pytest.approx((0.1,) * 3)


def test_an_unlisted_repo_without_preprocessing_files_warns(hub, tmp_path, caplog):
    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", **TINY)).eval()
    _put(hub, "someorg/tiny-vit", {"model.safetensors": _weights(model, tmp_path)})
    with caplog.at_level(logging.WARNING):
        loaded = vitlab.create_model("vit_tiny_patch16_224", pretrained="hf-hub:someorg/tiny-vit", **TINY)
    assert "hf-hub:someorg/tiny-vit: the repo states no preprocessing" in caplog.text
    assert "vit_tiny_patch16_224's default preprocessing" in caplog.text
    assert loaded.preprocessing.mean == model.preprocessing.mean
    caplog.clear()
    config = {"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    _put(hub, "someorg/tiny-timm", {"model.safetensors": _weights(model, tmp_path),
                                    "config.json": json.dumps(config).encode()})
    with caplog.at_level(logging.WARNING):
        vitlab.create_model("vit_tiny_patch16_224", pretrained="hf-hub:someorg/tiny-timm", **TINY)
    assert "states no preprocessing" not in caplog.text


# ------------------------------------------------------------------ 2. timm's spellings
def _tiny_repo(hub: Path, tmp_path: Path, repo: str, seed: int = 0, revision: str = "main",
               config: bool = True) -> torch.nn.Module:
    model = perturb_(vitlab.create_model("vit_tiny_patch16_224", **TINY), seed=seed).eval()
    files = {"model.safetensors": _weights(model, tmp_path, f"w{seed}.safetensors")}
    if config:  # as timm's save_for_hf writes it
        files["config.json"] = json.dumps({
            "architecture": "vit_tiny_patch16_224", "num_classes": 3,
            "model_args": {"embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 32},
            "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}).encode()
    _put(hub, repo, files, revision=revision)
    return model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_timms_hf_hub_underscore_prefix_is_accepted(hub, tmp_path):
    model = _tiny_repo(hub, tmp_path, "someorg/tiny")
    assert _same(vitlab.create_model("vit_tiny_patch16_224", pretrained="hf_hub:someorg/tiny"), model)
    assert vitlab.load_model("hf_hub:someorg/tiny").model_name == "vit_tiny_patch16_224"


def test_a_hub_repo_as_the_model_name_builds_the_architecture_its_config_names(hub, tmp_path):
    model = _tiny_repo(hub, tmp_path, "someorg/tiny-vit.sometag")
    for spelling in ("hf-hub:someorg/tiny-vit.sometag", "hf_hub:someorg/tiny-vit.sometag"):
        for pretrained in (None, True):
            m = vitlab.create_model(spelling, pretrained=pretrained)
            assert m.model_name == "vit_tiny_patch16_224" and _same(m, model), (spelling, pretrained)
    assert vitlab.create_model("hf-hub:someorg/tiny-vit.sometag", num_classes=7).num_classes == 7
    with pytest.raises(ValueError, match=r"a hub repo as the name loads its own weights; give one source"):
        vitlab.create_model("hf-hub:someorg/tiny-vit.sometag", pretrained="other.safetensors")


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_a_listed_repo_without_config_as_the_model_name_is_the_rows_model(hub, monkeypatch):
    name, tag = "mixer_b16_224", "miil_in21k_ft_in1k"
    _put(hub, f"timm/{name}.{tag}", {"model.safetensors": b""})
    _published_tensors(monkeypatch, _timm_layout(name, tag))
    with torch.device("meta"):
        m = vitlab.create_model(f"hf-hub:timm/{name}.{tag}", pretrained=True)
    assert m.model_name == name and _pre(m) == _row_pre(find_weights(name, tag))


def test_a_repo_id_without_the_prefix_gives_the_spellings_that_load_it_and_keeps_the_tag():
    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    with pytest.raises(ValueError) as e:
        vitlab.create_model(repo, pretrained=True)
    text = str(e.value)
    assert f"create_model('hf-hub:{repo}')" in text
    assert "create_model('vit_tiny_patch16_224.augreg_in21k_ft_in1k', pretrained=True)" in text
    assert "did you mean vit_tiny_patch16_224," not in text and "did you mean vit_tiny_patch16_224?" not in text


def test_a_misspelled_name_with_a_tag_suggests_names_with_that_tag():
    with pytest.raises(ValueError) as e:
        vitlab.create_model("vit_tiny_patch16_22.augreg_in21k_ft_in1k", pretrained=True)
    text = str(e.value)
    assert "did you mean vit_tiny_patch16_224.augreg_in21k_ft_in1k" in text
    assert "vit_tiny_patch16_224," not in text  # never the bare name: it would load the default weights


def test_a_revision_after_at_loads_that_revision(hub, tmp_path):
    main = _tiny_repo(hub, tmp_path, "someorg/revs", seed=0)
    v1 = _tiny_repo(hub, tmp_path, "someorg/revs", seed=1, revision="v1")
    assert _same(vitlab.load_model("hf-hub:someorg/revs@v1"), v1)
    assert _same(vitlab.load_model("hf-hub:someorg/revs"), main)
    assert not _same(main, v1)
    with pytest.raises(CheckpointError, match=r"for the revision 'v2'"):
        vitlab.load_model("hf-hub:someorg/revs@v2")


def test_a_repo_missing_from_the_cache_names_the_cache_folder(hub):
    with pytest.raises(CheckpointError) as e:
        vitlab.create_model("vit_tiny_patch16_224", pretrained="hf-hub:someorg/absent")
    assert "hf-hub:someorg/absent: not reachable and not in the local Hugging Face cache" in str(e.value)
    assert str(hub / "models--someorg--absent") in str(e.value)


def _fake_snapshot_download(monkeypatch, folder: Path, fail_online: Exception | None = None) -> list[dict]:
    import huggingface_hub

    calls: list[dict] = []

    def fake(repo_id, **kwargs):
        calls.append({"repo_id": repo_id, **kwargs})
        if fail_online is not None and not kwargs.get("local_files_only"):
            raise fail_online
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_online_the_pickles_are_fetched_only_without_a_safetensors_file(tmp_path, monkeypatch):
    from vitlab.checkpoints.load import resolve

    both = tmp_path / "both"
    both.mkdir()
    (both / "model.safetensors").write_bytes(b"")
    calls = _fake_snapshot_download(monkeypatch, both)
    assert resolve("hf-hub:timm/some_model.tag@v2") == both
    assert len(calls) == 1 and not any(p.endswith(".bin") for p in calls[0]["allow_patterns"])
    assert "*.safetensors" in calls[0]["allow_patterns"] and "*.json" in calls[0]["allow_patterns"]
    assert (calls[0]["repo_id"], calls[0]["revision"]) == ("timm/some_model.tag", "v2")
    pickles = tmp_path / "pickles"
    pickles.mkdir()
    (pickles / "pytorch_model.bin").write_bytes(b"")
    calls = _fake_snapshot_download(monkeypatch, pickles)
    assert resolve("hf-hub:someorg/old") == pickles
    assert len(calls) == 2 and "*.bin" in calls[1]["allow_patterns"] and calls[1]["revision"] is None


def test_a_failed_download_that_falls_back_on_the_cache_says_so(tmp_path, monkeypatch, caplog):
    from vitlab.checkpoints.load import resolve

    (tmp_path / "model.safetensors").write_bytes(b"")
    calls = _fake_snapshot_download(monkeypatch, tmp_path, fail_online=ConnectionError("connection reset by peer"))
    with caplog.at_level(logging.WARNING):
        assert resolve("hf-hub:someorg/tiny") == tmp_path
    assert calls[-1]["local_files_only"] is True
    assert "hf-hub:someorg/tiny" in caplog.text and "connection reset by peer" in caplog.text


# ------------------------------------------------------------------ 2. NAME.TAG on the command line
def test_a_tagged_model_name_without_pretrained_says_how_to_get_the_weights(tmp_path, caplog):
    from vitlab.cli.main import main

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(_weights(vitlab.create_model("vit_tiny_patch16_224", **TINY), tmp_path))
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        code = main(["predict", str(weights), "--checkpoint", str(weights),
                     "--model", "mixer_b16_224.miil_in21k_ft_in1k"])
    assert code == 2
    assert "`vitlab finetune --from mixer_b16_224.miil_in21k_ft_in1k`" in caplog.text
    assert "`--checkpoint hf-hub:timm/mixer_b16_224.miil_in21k_ft_in1k` for predict, eval" in caplog.text
    assert "name the architecture alone: mixer_b16_224 (--model mixer_b16_224)" in caplog.text
    assert "mixer_b16_224.'miil" not in caplog.text


def _finetune_job(monkeypatch, argv: list[str]):
    import vitlab.cli.finetune as finetune
    from vitlab.cli.main import main

    jobs = []
    monkeypatch.setattr(finetune, "train_or_explain", lambda job: jobs.append(job) or 0)
    code = main(["finetune", *argv])
    return code, jobs[0] if jobs else None


def test_finetune_from_a_registered_name_is_its_published_weights(monkeypatch, tmp_path, caplog):
    code, job = _finetune_job(monkeypatch, ["--from", "mixer_b16_224.miil_in21k_ft_in1k", "--img-size", "32",
                                            "--output", str(tmp_path / "run")])
    assert code == 0
    assert (job.model, job.pretrained) == ("mixer_b16_224", "hf-hub:timm/mixer_b16_224.miil_in21k_ft_in1k")
    code, job = _finetune_job(monkeypatch, ["--from", "vit_small_patch8_224", "--img-size", "32",
                                            "--output", str(tmp_path / "run")])
    assert (job.model, job.pretrained) == ("vit_small_patch8_224", find_weights("vit_small_patch8_224").hub)
    with caplog.at_level(logging.ERROR, logger="vitlab"):
        assert _finetune_job(monkeypatch, ["--from", "mixer_b16_224.nope", "--img-size", "32"])[0] == 2
        assert _finetune_job(monkeypatch, ["--from", "mixer_b16_224.miil_in21k", "--model", "mixer_l16_224",
                                           "--img-size", "32"])[0] == 2
    assert "--from mixer_b16_224.nope: 'mixer_b16_224' has no weights tagged 'nope'" in caplog.text
    assert "--model mixer_l16_224 names another model" in caplog.text


# ------------------------------------------------------------------ 3. a wrapper's prefix on every key
def _tiny_vit() -> torch.nn.Module:
    return perturb_(vitlab.create_model("vit_tiny_patch16_224", **TINY)).eval()


@pytest.mark.parametrize("prefix", ["model.", "net.", "net.model."])
def test_a_lightning_checkpoint_loads_without_its_attribute_prefix(tmp_path, caplog, prefix):
    model = _tiny_vit()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {prefix + k: v for k, v in model.state_dict().items()}, "epoch": 1,
                "global_step": 10, "pytorch-lightning_version": "2.4.0", "optimizer_states": [],
                "hyper_parameters": {"lr": 0.1}}, ckpt)
    with caplog.at_level(logging.INFO, logger="vitlab"):
        loaded = vitlab.create_model("vit_tiny_patch16_224", pretrained=ckpt, **TINY)
    assert _same(loaded, model)
    assert f"every key started with {prefix!r}" in caplog.text
    assert "zero-initialised" not in caplog.text  # nothing logged about the attempt with the prefix


def test_a_prefixed_safetensors_file_loads_too(tmp_path):
    model = _tiny_vit()
    path = tmp_path / "model.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert _same(vitlab.create_model("vit_tiny_patch16_224", pretrained=path, **TINY), model)


def test_prefixed_keys_that_do_not_fit_without_the_prefix_either_say_so(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in _tiny_vit().state_dict().items()}}, ckpt)
    with pytest.raises(CheckpointError) as e:
        vitlab.create_model("vit_tiny_patch16_224", pretrained=ckpt, **{**TINY, "depth": 3})
    text = str(e.value)
    assert f"{ckpt}: none of its keys is one of vit_tiny_patch16_224's" in text
    assert f"Every key of {ckpt} starts with 'model.'" in text
    assert "without it the keys do not fit either" in text and "missing keys: blocks.2." in text
    with pytest.raises(CheckpointError, match=r"Every key of .* starts with 'model.'"):  # another family's converter
        vitlab.create_model("swin_tiny_patch4_window7_224", pretrained=ckpt)


@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter")
def test_a_layout_whose_keys_need_their_shared_prefix_is_left_alone(tmp_path, monkeypatch):
    """A Hugging Face ViTForImageClassification without a head (num_labels 0) has only ``vit.`` keys, which its
    converter needs: it loads on the first try, nothing is stripped."""
    import vitlab.checkpoints.load as load

    case = _hf_case("vit_base")
    config = {**case["config"], "id2label": {}, "label2id": {}}
    layout = {k: v for k, v in case["layout"].items() if not k.startswith("classifier.")}
    assert {k.split(".")[0] for k in layout} == {"vit"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    _published_tensors(monkeypatch, layout)
    real, strips = load.read_source, []

    def spy(path, family, *, strip_prefix=None):
        strips.append(strip_prefix)
        return real(path, family, strip_prefix=strip_prefix)

    monkeypatch.setattr(load, "read_source", spy)
    monkeypatch.setattr("vitlab.checkpoints.read_source", spy)
    with torch.device("meta"):
        model = vitlab.load_model(tmp_path)
    assert model.num_classes == 0 and strips == [None]
