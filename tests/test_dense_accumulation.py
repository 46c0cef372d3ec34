"""Losses whose mean has a batch-dependent denominator (DETR's boxes and no-object weight, SETR's labelled pixels,
BEiT's masked patches) under gradient accumulation and DDP: the gradient of one process with the same global
batch. DDP is simulated in one process: each "process" counts its micro-batches, the counts are summed (the
all-reduce), and the gradients averaged (DDP's mean). Also: DETR's ViT backbone with padded batches, SETR
without labelled pixels, and the trainer's errors around them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

import vitlab
from dense_helpers import DETR_TINY, SETR_TINY, make_test_canvases
from vitlab.cli.main import main
from vitlab.data.dense import pad_batch
from vitlab.layers import capture_attention
from vitlab.models.setr import segmentation_loss
from vitlab.tasks.detection import DetectionObjective
from vitlab.tasks.segmentation import SegmentationObjective
from vitlab.train import NonFiniteLossError, fit
from vitlab.train.objective import Objective, StepBatches
from vitlab.train.recipe import Recipe
from vitlab.train.trainer import OutOfBatchesError

torch.set_num_threads(1)


def step_gradient(model, objective: Objective, per_process: list[list], seed: int = 0) -> Tensor:
    """The gradient one optimiser step gives, as the trainer computes it: each process's micro-batches through
    ``begin_step`` (the counts summed over the processes), each micro-batch's loss / accum, DDP's mean."""
    world = len(per_process)
    counts: list[Tensor] = []
    torch.manual_seed(seed)
    for micro in per_process:  # the all-reduce's inputs
        objective.begin_step(StepBatches(micro, world, lambda t: counts.append(t) or t))
        objective.end_step()
    total = sum(counts) if counts else None
    params = [p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad]
    for p in params:
        p.grad = None
    torch.manual_seed(seed)  # the same draws (BEiT's masks) as the counting pass
    for micro in per_process:
        objective.begin_step(StepBatches(micro, world, lambda t: total.clone()))
        for batch in micro:
            loss, _ = objective.step(model, batch)
            (loss / len(micro) / world).backward()
        objective.end_step()
    return torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten() for p in params])


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------------ DETR
def detr_samples() -> list[dict]:
    """Six grey images with 1, 3, 0, 2, 4, 1 boxes: micro-batches of two hold 4, 2 and 5 boxes."""
    g = torch.Generator().manual_seed(1)
    out = []
    for n in (1, 3, 0, 2, 4, 1):
        cxcy = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
        wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
        out.append({"image": torch.randn(1, 32, 32, generator=g), "labels": torch.randint(0, 3, (n,), generator=g),
                    "boxes": torch.cat([cxcy, wh], 1)})
    return out


def detr_model():
    torch.manual_seed(0)
    return vitlab.create_model("detr_resnet50", **{**DETR_TINY, "num_classes": 3, "img_size": 32}).train()


@pytest.mark.parametrize("terms", ["all", "loss_ce", "boxes"])
def test_detr_accumulation_and_ddp_give_one_batchs_gradient(terms: str) -> None:
    model = detr_model()
    obj = DetectionObjective(3)
    obj.setup(model, steps_per_epoch=1, total_steps=1)
    if terms != "all":  # each denominator on its own: the no-object weight's sum, the box count
        obj.criterion.weights = ({"loss_ce": 1.0, "loss_bbox": 0.0, "loss_giou": 0.0} if terms == "loss_ce" else
                                 {"loss_ce": 0.0, "loss_bbox": 5.0, "loss_giou": 2.0})
    s = detr_samples()
    full = step_gradient(model, obj, [[pad_batch(s)]])
    pairs = [pad_batch(s[i:i + 2]) for i in (0, 2, 4)]
    thirds = [[pad_batch(s[:3])], [pad_batch(s[3:])]]
    assert rel(step_gradient(model, obj, [pairs]), full) < 1e-5  # accumulation 3 x 2
    assert rel(step_gradient(model, obj, thirds), full) < 1e-5  # 2 processes x 3
    assert rel(step_gradient(model, obj, [[pairs[0]], [pairs[1]], [pairs[2]]]), full) < 1e-5  # 3 processes x 2
    assert rel(step_gradient(model, obj, [[pad_batch(s[:1]), pad_batch(s[1:3])], [pad_batch(s[3:6])]]), full) < 1e-5


def test_detr_one_batch_loss_is_the_criterions_own() -> None:
    """One process, no accumulation: the same loss and terms as the criterion on its own (per-batch means)."""
    model = detr_model()
    obj = DetectionObjective(3)
    obj.setup(model, steps_per_epoch=1, total_steps=1)
    batch = pad_batch(detr_samples())
    alone, parts_alone = obj.step(model, batch)
    obj.begin_step(StepBatches([batch]))
    planned, parts = obj.step(model, batch)
    obj.end_step()
    torch.testing.assert_close(planned, alone, rtol=1e-6, atol=0)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(parts[k], parts_alone[k], rtol=1e-6, atol=0)


class Boxes(torch.utils.data.Dataset):
    collate = staticmethod(pad_batch)

    def __init__(self) -> None:
        self.samples = detr_samples()[:4]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def test_fit_with_accumulation_trains_detr_as_one_batch(tmp_path: Path) -> None:
    recipe = Recipe(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant", max_steps=1,
                    warmup_steps=0, warmup_epochs=0, workers=0, augment=False, log_every=1)
    runs = {}
    for name, batch, accum in (("one", 4, 1), ("accum", 1, 4)):
        model = detr_model()
        res = fit(model, recipe.replace(batch_size=batch, accum_steps=accum), train_set=Boxes(),
                  objective=DetectionObjective(3), output_dir=tmp_path / name, progress=False)
        runs[name] = (res.history[0], {k: v.detach().clone() for k, v in model.state_dict().items()})
    (h1, w1), (h2, w2) = runs["one"], runs["accum"]
    for k in ("loss", "loss_ce", "loss_bbox", "loss_giou"):
        assert h2[k] == pytest.approx(h1[k], rel=1e-5, abs=2e-6), k
    start = detr_model().state_dict()
    for k in w1:
        if w1[k].is_floating_point():
            torch.testing.assert_close(w2[k] - start[k], w1[k] - start[k], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------------ SETR
def setr_batches() -> tuple[list[Tensor], list[Tensor]]:
    """Four grey 32 px images; their masks leave a band of 0, 5, 10 and 20 columns unlabelled (255)."""
    g = torch.Generator().manual_seed(2)
    images = torch.randn(4, 1, 32, 32, generator=g)
    masks = torch.randint(0, 3, (4, 32, 32), generator=g)
    for i, w in enumerate((0, 5, 10, 20)):
        masks[i, :, :w] = 255
    return images, masks


def setr_model():
    torch.manual_seed(0)
    model = vitlab.create_model("setr_pup_vit_small_patch16", **{**SETR_TINY, "num_classes": 3, "img_size": 32})
    model.train()
    for m in model.modules():  # the decoder's batch statistics would differ per micro-batch: not the loss's doing
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def test_setr_accumulation_and_ddp_with_unlabelled_pixels_give_one_batchs_gradient() -> None:
    model, obj = setr_model(), SegmentationObjective(aux_weight=0.4)
    x, y = setr_batches()
    full = step_gradient(model, obj, [[(x, y)]])
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    assert rel(step_gradient(model, obj, [halves]), full) < 1e-5
    assert rel(step_gradient(model, obj, [[halves[0]], [halves[1]]]), full) < 1e-5
    assert rel(step_gradient(model, obj, [[(x[:1], y[:1])], [(x[1:], y[1:])]]), full) < 1e-5


def test_setr_micro_batch_without_labelled_pixels_adds_nothing() -> None:
    model, obj = setr_model(), SegmentationObjective(aux_weight=0.4)
    x, y = setr_batches()
    y[2:] = 255  # the second micro-batch has no labelled pixel
    full = step_gradient(model, obj, [[(x, y)]])
    acc = step_gradient(model, obj, [[(x[:2], y[:2]), (x[2:], y[2:])]])
    assert torch.isfinite(acc).all() and rel(acc, full) < 1e-5
    # a whole batch without a labelled pixel: loss 0, not NaN, under the trainer and on its own
    y[:] = 255
    obj.begin_step(StepBatches([(x, y)]))
    loss, _ = obj.step(model, (x, y))
    obj.end_step()
    alone, _ = segmentation_loss(model(x), y)
    assert loss.item() == 0.0 and alone.item() == 0.0


# ------------------------------------------------------------------------------------------------ BEiT
def test_beit_accumulation_and_ddp_give_one_batchs_gradient() -> None:
    from vitlab.ssl.beit import BEiT, BlockMasker

    torch.manual_seed(0)
    model = vitlab.create_model("vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=1, embed_dim=16,
                                depth=1, num_heads=2, mlp_ratio=2.0)  # a 16 x 16 grid: about 98 masked, in blocks
    obj = BEiT(model, vocab_size=8).fit_tokenizer(torch.randn(8, 3, 16, 16), iters=3)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    full = step_gradient(model, obj, [[x]])
    assert rel(step_gradient(model, obj, [[x[:2], x[2:]]]), full) < 1e-5
    assert rel(step_gradient(model, obj, [[x[:2]], [x[2:]]]), full) < 1e-5
    torch.manual_seed(0)  # the masks step_gradient drew: their counts differ, so per-micro-batch means would too
    masks = BlockMasker(obj.mask_embedding.weight).draw(4, (16, 16))
    assert masks[:2].sum() != masks[2:].sum()
    # one batch, no accumulation: the masked-token mean, as without the trainer
    torch.manual_seed(5)
    obj.begin_step(StepBatches([x]))
    planned, _ = obj.step(model, x)
    obj.end_step()
    torch.manual_seed(5)
    alone, _ = obj.step(model, x)
    torch.testing.assert_close(planned, alone, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------ DETR, ViT
def vit_detr():
    torch.manual_seed(0)
    return vitlab.create_model("detr_vit_small_patch16", num_classes=10, dim=64, num_heads=2, enc_depth=1,
                               dec_depth=2, ffn_dim=64, num_queries=5, img_size=64,
                               backbone_args=dict(depth=2, embed_dim=64, num_heads=2, img_size=64,
                                                  dynamic_img_size=True)).eval()


def test_vit_detr_predictions_do_not_depend_on_the_batchs_padding() -> None:
    model = vit_detr()
    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 64, 64, generator=g), torch.randn(3, 96, 128, generator=g), torch.randn(3, 50, 70, generator=g)
    batch = pad_batch([{"image": im} for im in (a, b, c, a)])[:2]
    with torch.no_grad():
        together = model(*batch)
        alone = [model(im[None]) for im in (a, b, c)]
        with capture_attention(model):
            captured = model(*batch)
    for i, j in enumerate((0, 1, 2, 0)):
        for k in ("logits", "boxes"):
            torch.testing.assert_close(together[k][i], alone[j][k][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(captured[k][i], together[k][i], atol=1e-5, rtol=1e-5)
    # training through the grouped backbone reaches its weights
    model.train()
    model(*batch)["logits"].sum().backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


def test_vit_detr_explain_keeps_the_padded_batchs_grid() -> None:
    from vitlab.analysis.explain_detr import detection_attention

    model = vit_detr()
    x, mask = pad_batch([{"image": torch.randn(3, 64, 64)}, {"image": torch.randn(3, 96, 128)}])[:2]
    out, maps = detection_attention(model, x, mask)
    assert model._feature_size == (6, 8) and maps.shape == (2, 5, 6, 8)
    assert maps[0, :, 4:].abs().max() == 0 and maps[0, :, :, 4:].abs().max() == 0  # padding never attended


# ------------------------------------------------------------------------------------------------ errors
class Nan(Objective):
    name = "nan"

    def step(self, model, batch):
        return model(batch[0]).sum() * float("nan"), {}


def test_a_non_finite_loss_before_any_checkpoint_says_there_is_none(tmp_path: Path) -> None:
    from model_helpers import make_tiny

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long))
    recipe = Recipe(optimizer="sgd", lr=0.1, batch_size=4, max_steps=2, workers=0, augment=False, warmup_steps=0,
                    warmup_epochs=0)
    with pytest.raises(NonFiniteLossError, match="step 1") as e:
        fit(make_tiny("vit_tiny_patch16_224", num_classes=2, img_size=16), recipe, train_set=data, objective=Nan(),
            output_dir=tmp_path, progress=False)
    assert "no last good checkpoint yet (none was written" in str(e.value) and "--resume" not in str(e.value)


class WithHoles(torch.utils.data.Dataset):
    """Samples 1..3 are undecodable (None, as a skip_bad_images data set gives)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return None if i else (torch.randn(3, 16, 16), 0)

    @staticmethod
    def collate(batch):
        kept = [b for b in batch if b is not None]
        return torch.utils.data.default_collate(kept) if kept else None


@pytest.mark.parametrize("batch_size", [1, 2])
def test_running_out_of_batches_suggests_a_smaller_batch_only_where_there_is_one(tmp_path: Path,
                                                                                 batch_size: int) -> None:
    from model_helpers import make_tiny

    recipe = Recipe(optimizer="sgd", lr=0.1, batch_size=batch_size, accum_steps=4 // batch_size, max_steps=1,
                    workers=0, augment=False, warmup_steps=0, warmup_epochs=0)
    with pytest.raises(OutOfBatchesError, match="ran out of batches") as e:
        fit(make_tiny("vit_tiny_patch16_224", num_classes=2, img_size=16), recipe, train_set=WithHoles(),
            output_dir=tmp_path, progress=False)
    assert ("lower --batch-size" in str(e.value)) == (batch_size > 1)


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    """Segmentation canvases whose training masks are all unlabelled (255)."""
    import numpy as np
    from PIL import Image

    tmp = tmp_path_factory.mktemp("unlabelled")
    make_test_canvases(tmp)
    for f in sorted((tmp / "c" / "train" / "masks").iterdir()):
        Image.fromarray(np.full((32, 32), 255, dtype=np.uint8)).save(f)
    recipe = tmp / "r.json"
    recipe.write_text(json.dumps({"model": "setr_pup_vit_small_patch16", "model_overrides": SETR_TINY,
                                  "img_size": 32, "max_steps": 1, "batch_size": 1, "accum_steps": 2,
                                  "augment": False, "hflip": 0.0, "cpu_threads": 1, "log_every": 1}))
    return tmp


def test_segmentation_without_labelled_pixels_trains_with_loss_zero(unlabelled: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--task", "segmentation", "--data", str(unlabelled / "c"), "--recipe",
                 str(unlabelled / "r.json"), "--output", str(out), "--no-progress"]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == 0.0


def test_segmentation_non_finite_loss_is_one_error_line(unlabelled: Path, tmp_path: Path, monkeypatch,
                                                        caplog) -> None:
    def nan_step(self, model, batch):
        return model(batch[0])["logits"].sum() * float("nan"), {}

    monkeypatch.setattr(SegmentationObjective, "step", nan_step)
    with caplog.at_level(logging.INFO):
        code = main(["train", "--task", "segmentation", "--data", str(unlabelled / "c"), "--recipe",
                     str(unlabelled / "r.json"), "--output", str(tmp_path / "run"), "--no-progress"])
    assert code == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith("error: non-finite loss") and "\n" not in error
    assert "no last good checkpoint yet" in error and "--resume" not in error
