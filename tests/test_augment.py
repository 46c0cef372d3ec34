"""Transforms and augmentation: eval pipeline vs Pillow, RandAugment ops vs Pillow, determinism under a
seed, random erasing, Mixup/CutMix targets, repeated-augmentation sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from vitlab.data import (
    Mixup,
    RandAugment,
    RepeatAugSampler,
    apply_op,
    eval_transform,
    one_hot_smooth,
    train_transform,
)
from vitlab.data.functional import Rng, affine, random_resized_crop_params
from vitlab.data.randaugment import OPS
from vitlab.data.transforms import RandomErasing
from vitlab.models.base import IMAGENET_MEAN, IMAGENET_STD, Preprocessing


def rand_img(h=24, w=20, c=3, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (c, h, w), generator=g, dtype=torch.uint8)


def smooth_img(h=24, w=20) -> torch.Tensor:
    """A photo-like image (smooth gradients) where interpolation differences stay small."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([yy * 200 + 20, xx * 180 + 40, (yy + xx) * 100 + 10])
    return img.round().to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy()) if x.shape[0] == 3 else Image.fromarray(x[0].numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.array(im))
    return a.permute(2, 0, 1) if a.ndim == 3 else a[None]


# ------------------------------------------------------------------------------------------- eval


def test_eval_transform_matches_pillow_pipeline():
    pre = Preprocessing(input_size=(3, 32, 32), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
                        interpolation="bicubic")
    x = smooth_img(60, 80)
    out = eval_transform(pre)(x)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # Independent reference: Pillow resize (shorter side -> floor(32 / 0.875) = 36), centre crop, scale.
    im = to_pil(x).resize((48, 36), Image.BICUBIC)
    left, top = (48 - 32) // 2, (36 - 32) // 2
    ref = from_pil(im.crop((left, top, left + 32, top + 32))).float() / 255
    ref = (ref - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert (out - ref).abs().max() < 2.5 / 255 / min(IMAGENET_STD)


def test_eval_transform_normalisation_and_channels():
    pre = Preprocessing(input_size=(3, 224, 224), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x = torch.full((1, 8, 8), 200, dtype=torch.uint8)  # digits-like grayscale input
    out = eval_transform(pre)(x)
    want = (200 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.2, 0.25, 0.5])
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out.mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
    assert out.std(dim=(1, 2)).max() < 1e-5
    gray_pre = Preprocessing(input_size=(1, 16, 16), mean=(0.5,), std=(0.5,), crop_pct=1.0)
    rgb = rand_img(16, 16)
    out1 = eval_transform(gray_pre)(rgb)
    luma = (rgb.float() / 255 * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    assert out1.shape == (1, 16, 16)
    torch.testing.assert_close(out1[0], (luma - 0.5) / 0.5, atol=1e-5, rtol=0)


def test_eval_transform_non_square_and_centre():
    pre = Preprocessing(input_size=(3, 16, 16), mean=(0, 0, 0), std=(1, 1, 1), crop_pct=1.0, interpolation="nearest")
    x = torch.zeros(3, 16, 48, dtype=torch.uint8)
    x[:, :, 16:32] = 255  # the middle third is white: the centre crop must be all white
    out = eval_transform(pre)(x)
    assert out.shape == (3, 16, 16) and out.min() == 1.0


# ------------------------------------------------------------------------------------------ train


def test_train_transform_seeded_and_shapes():
    pre = Preprocessing(input_size=(3, 32, 32))
    x = rand_img(40, 50)
    kw = {"randaugment": (2, 9), "randaugment_mstd": 0.5, "re_prob": 0.5}
    a = [train_transform(pre, generator=torch.Generator().manual_seed(1), **kw)(x) for _ in range(2)]
    b = train_transform(pre, generator=torch.Generator().manual_seed(2), **kw)(x)
    assert a[0].shape == (3, 32, 32) and torch.equal(a[0], a[1]) and not torch.equal(a[0], b)
    # Global-RNG path (generator=None): reproducible under torch.manual_seed.
    t = train_transform(pre, **kw)
    torch.manual_seed(3)
    c1 = t(x)
    torch.manual_seed(3)
    assert torch.equal(c1, t(x))
    # A stream of calls is not constant.
    t = train_transform(pre, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(t(x), t(x))


def test_train_transform_gray_to_rgb_and_no_aug_is_resize():
    pre = Preprocessing(input_size=(3, 8, 8), mean=(0, 0, 0), std=(1, 1, 1))
    x = torch.full((1, 8, 8), 51, dtype=torch.uint8)
    out = train_transform(pre, scale=(1, 1), ratio=(1, 1), hflip=0.0)(x)
    torch.testing.assert_close(out, torch.full((3, 8, 8), 0.2), atol=1e-6, rtol=0)


def test_random_resized_crop_params_bounds():
    rng = Rng(torch.Generator().manual_seed(0))
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(30, 50, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50 and h > 0 and w > 0
        assert h * w <= 30 * 50 * 1.0 + 50  # rounding slack
    # Impossible request (ratio outside the image shape at full scale) -> centred fallback within ratio.
    top, left, h, w = random_resized_crop_params(10, 100, (1.0, 1.0), (1.0, 1.0), rng)
    assert (h, w) == (10, 10) and left == 45


def test_random_erasing_pixel_noise():
    x = torch.zeros(3, 40, 40)
    seen = 0
    for s in range(20):
        out = RandomErasing(1.0, generator=torch.Generator().manual_seed(s))(x)
        erased = (out != 0).any(0)
        area = int(erased.sum())
        if area:
            seen += 1
            ys, xs = torch.nonzero(erased, as_tuple=True)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            assert box == area  # one rectangle
            assert 0.015 * 1600 <= area <= 0.36 * 1600
            vals = out[:, erased]
            assert vals.std() > 0.5 and not torch.equal(vals[0], vals[1])  # per-pixel, per-channel noise
    assert seen >= 18
    assert torch.equal(RandomErasing(0.0)(x), x)


# ------------------------------------------------------------------------------------ RandAugment


class PlusRng(Rng):
    """Rng whose random sign is always +1, so enhancement factors are known."""

    def sign(self) -> float:
        return 1.0


@pytest.mark.parametrize("level", [0.0, 3.0, 7.0, 10.0])
def test_randaugment_enhance_ops_match_pillow(level):
    x = rand_img(20, 24, seed=5)
    im = to_pil(x)
    factor = 1.0 + 0.9 * level / 10
    cases = {
        "color": ImageEnhance.Color(im).enhance(factor),
        "contrast": ImageEnhance.Contrast(im).enhance(factor),
        "brightness": ImageEnhance.Brightness(im).enhance(factor),
        "sharpness": ImageEnhance.Sharpness(im).enhance(factor),
    }
    for name, ref in cases.items():
        got = apply_op(name, x, level, PlusRng())
        diff = (got.int() - from_pil(ref).int()).abs().max()
        assert diff <= 2, f"{name} level {level}: max diff {diff}"


def test_randaugment_pixel_ops_match_pillow():
    x = rand_img(20, 24, seed=6)
    x[0] = x[0] // 2 + 40  # a channel with a narrow range, so autocontrast has work to do
    im = to_pil(x)
    assert torch.equal(apply_op("equalize", x, 5), from_pil(ImageOps.equalize(im)))
    assert (apply_op("autocontrast", x, 5).int() - from_pil(ImageOps.autocontrast(im)).int()).abs().max() <= 1
    assert torch.equal(apply_op("solarize", x, 5), from_pil(ImageOps.solarize(im, 128)))
    assert torch.equal(apply_op("posterize", x, 5), from_pil(ImageOps.posterize(im, 2)))  # timm's 4 - int(2.0)
    for name in OPS:
        assert torch.equal(apply_op(name, x, 0.0, Rng()), x) or name in ("autocontrast", "equalize", "invert",
                                                                          "posterize"), name


def test_affine_conventions():
    x = rand_img(12, 20).float()
    # 180 degrees about the centre is an exact double flip, on a non-square image too.
    torch.testing.assert_close(affine(x, ((-1.0, 0.0), (0.0, -1.0))), x.flip(1).flip(2), atol=1e-3, rtol=0)
    sq = rand_img(16, 16).float()
    r90 = affine(sq, ((0.0, -1.0), (1.0, 0.0)))
    assert any(torch.allclose(r90, torch.rot90(sq, k, (1, 2)), atol=1e-3) for k in (1, 3))
    # translate_x at level 10 moves a 20-wide image by 0.45 * 20 = 9 pixels and fills the gap.
    u = rand_img(12, 20)
    out = apply_op("translate_x", u, 10.0, PlusRng(), fill=7)
    assert torch.equal(out[:, :, :11], u[:, :, 9:]) and (out[:, :, 11:] == 7).all()
    # Image content survives rotation near the centre.
    rot = apply_op("rotate", u, 10.0, Rng(), fill=0)
    assert rot.shape == u.shape and (rot == 0).any()


def test_randaugment_seeded_and_float_input():
    x = rand_img(32, 32, seed=9)
    ra = lambda s: RandAugment(2, 9, magnitude_std=0.5, generator=torch.Generator().manual_seed(s))
    outs = [ra(s)(x) for s in range(8)]
    assert torch.equal(ra(3)(x), outs[3])
    assert len({o.numpy().tobytes() for o in outs}) >= 5
    xf = x.float() / 255
    of = RandAugment(2, 9, prob=1.0, generator=torch.Generator().manual_seed(0))(xf)
    ou = RandAugment(2, 9, prob=1.0, generator=torch.Generator().manual_seed(0))(x)
    assert of.dtype == torch.float32 and (of * 255 - ou.float()).abs().max() <= 1.5
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(2, 11)


# ------------------------------------------------------------------------------------ Mixup / CutMix


def test_one_hot_smooth():
    t = one_hot_smooth(torch.tensor([2, 0]), 4, 0.1)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert t[0, 2] == pytest.approx(0.925) and t[0, 0] == pytest.approx(0.025)


def test_cutmix_label_weight_is_pasted_area():
    B, K, H, W = 4, 5, 16, 12
    x = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    for s in range(60):
        mix = Mixup(num_classes=K, mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0,
                    generator=torch.Generator().manual_seed(s))
        xm, t = mix(x, y)
        torch.testing.assert_close(t.sum(1), torch.ones(B))
        pasted = (xm[0, 0] == B - 1).float().mean().item()  # sample 0 receives sample B-1's pixels
        assert t[0, 3].item() == pytest.approx(pasted, abs=1e-6)
        assert t[0, 0].item() == pytest.approx(1 - pasted, abs=1e-6)
        assert mix.last_mode == "cutmix" and mix.last_lam == pytest.approx(1 - pasted)


class CornerRng(Rng):
    def randint(self, low: int, high: int) -> int:
        return low  # box centre at the top-left corner


def test_cutmix_box_is_clipped():
    # lam = 0.75 asks for a quarter of the image (an 8x6 box of 16x12); centred at the corner only a
    # quarter of that box lies inside, which is why the label weight is recomputed from the box.
    y0, y1, x0, x1 = Mixup.cutmix_box(16, 12, 0.75, CornerRng())
    assert (y0, y1, x0, x1) == (0, 4, 0, 3)


def test_mixup_blend_and_smoothing():
    B, K = 6, 3
    x = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mix = Mixup(num_classes=K, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1,
                generator=torch.Generator().manual_seed(1))
    xm, t = mix(x, y)
    lam = mix.last_lam
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(t.sum(1), torch.ones(B))
    ref = lam * one_hot_smooth(y, K, 0.1) + (1 - lam) * one_hot_smooth(y.flip(0), K, 0.1)
    torch.testing.assert_close(t, ref)
    # prob=0: labels only smoothed, images untouched; same seed -> same result.
    xm0, t0 = Mixup(num_classes=K, prob=0.0)(x, y)
    assert torch.equal(xm0, x) and torch.allclose(t0, one_hot_smooth(y, K, 0.1))
    g = lambda: torch.Generator().manual_seed(7)
    a = Mixup(num_classes=K, generator=g())(x, y)
    b = Mixup(num_classes=K, generator=g())(x, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -------------------------------------------------------------------------------------- sampler


def test_repeat_aug_sampler():
    n, reps, world = 10, 3, 2
    per_rank = [list(RepeatAugSampler(n, world, r, num_repeats=reps, seed=1)) for r in range(world)]
    assert all(len(p) == math.ceil(n / world) for p in per_rank)
    s = RepeatAugSampler(n, world, 0, num_repeats=reps, seed=1)
    assert len(s) == 5 and list(s) == per_rank[0]
    s.set_epoch(1)
    assert list(s) != per_rank[0]
    # The copies of one image are spread over the ranks: position j on rank 0 and rank 1 are
    # consecutive entries of the repeated list, so mostly the same image.
    same = sum(a == b for a, b in zip(per_rank[0], per_rank[1]))
    assert same >= 3
    single = list(RepeatAugSampler(n, 1, 0, num_repeats=1, seed=0))
    assert sorted(single) == list(range(n))  # no repetition -> a permutation
    assert list(RepeatAugSampler(6, 1, 0, shuffle=False, num_repeats=2)) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="rank"):
        RepeatAugSampler(n, 2, 2)


# ------------------------------------------------------------------------------ loader determinism


def test_loader_augmentation_reproducible_across_runs_and_workers():
    from vitlab.data import build_dataset, create_loader

    pre = Preprocessing(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,))

    def first_batches(seed: int, workers: int) -> list[torch.Tensor]:
        tf = train_transform(pre, randaugment=(2, 9), re_prob=0.5, generator=torch.Generator().manual_seed(0))
        ds = build_dataset("digits", split="val", transform=tf)
        loader = create_loader(ds, batch_size=32, shuffle=True, seed=seed, num_workers=workers)
        return [x for x, _ in zip((b[0] for b in loader), range(2))]

    a, b, c = first_batches(1, 1), first_batches(1, 1), first_batches(2, 1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_transforms_pickle_with_generator_state():
    import pickle

    pre = Preprocessing(input_size=(3, 16, 16))
    t = train_transform(pre, randaugment=(2, 9), re_prob=0.5, generator=torch.Generator().manual_seed(5))
    x = rand_img(20, 20)
    t2 = pickle.loads(pickle.dumps(t))
    assert t2.randaugment.generator is t2.generator and t2.erasing.generator is t2.generator
    assert torch.equal(t(x), t2(x)) and torch.equal(t(x), t2(x))  # same state, same stream


def test_spawned_workers_receive_seeded_transform():
    from vitlab.data import build_dataset, create_loader

    tf = train_transform(Preprocessing(input_size=(1, 8, 8), mean=(0.5,), std=(0.5,)),
                         generator=torch.Generator().manual_seed(0))
    ds = build_dataset("digits", split="val", transform=tf)
    loader = create_loader(ds, batch_size=8, shuffle=False, num_workers=1, persistent_workers=False)
    loader.multiprocessing_context = "spawn"
    x, _ = next(iter(loader))
    assert x.shape == (8, 1, 8, 8)
