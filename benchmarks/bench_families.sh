#!/usr/bin/env bash
# vitlab plain PyTorch (float32, eager) against timm, one model per family with a timm twin; quiet machine.
# Issue 13: "vitlab's plain PyTorch path stays >= 1.0x timm's on every family". PYTHON: the peer venv (timm).
cd "$(dirname "$0")/.."
exec "${PYTHON:-/tmp/peers/bin/python}" benchmarks/bench_models.py --impls vitlab timm --dtypes float32 --modes infer \
  --batch-size 8 --repeats 3 --warmup 2 --threads 2 --out benchmarks/results/bench_families \
  --models vit_small_patch16_224 deit_small_distilled_patch16_224 cait_xxs24_224 vit_base_r50_s16_224 \
  swin_tiny_patch4_window7_224 swinv2_tiny_window8_256 mobilevit_s mobilevitv2_100 crossvit_tiny_240 \
  tnt_s_patch16_224 xcit_tiny_12_p16_224 mixer_s16_224 beit_base_patch16_224 beit3_base_patch16_224 "$@"
