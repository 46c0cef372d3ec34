#!/usr/bin/env bash
# Issue 13: does an int8 model still agree with the float one, on models trained on real data?
# Trains three families on the shared CIFAR-10 split (one thread each, side by side, a fixed time budget each),
# then exports each with --int8: `vitlab export` runs the seeded held-out images through float32 PyTorch and the
# int8 ONNX file and reports top-1 agreement, the largest logit difference and the speed.
#
#   vit        the shipped cifar10 recipe's ViT (width 64, depth 6, 4 px patches, 32 px)
#   swin       swin_tiny_patch4_window7_224 at 32 px with 4x4 windows (Swin-T's widths and depths)
#   swin_cifar the cifar10_swin recipe's small Swin (2 px patches, widths 32/64/128, window 4), which trains
#              well on one thread
#   mobilevit  mobilevit_xxs at 64 px
#   cct        the auto recipe's CCT (whatever --time-budget chooses for CIFAR-10 on one thread)
#
# Usage: benchmarks/int8_trained.sh [WHICH...]   Env: CIFAR (/tmp/tta_cifar10, extracted by time_to_accuracy.sh),
#        OUT (/tmp/int8_trained), BUDGET (12m per model), IMAGES (2000 held-out images for the agreement)
set -euo pipefail
cd "$(dirname "$0")/.."
CIFAR=${CIFAR:-/tmp/tta_cifar10}
OUT=${OUT:-/tmp/int8_trained}
BUDGET=${BUDGET:-12m}
IMAGES=${IMAGES:-2000}
V=.venv/bin/vitlab
WHICH=("$@")
[ ${#WHICH[@]} -gt 0 ] || WHICH=(vit swin mobilevit cct)
mkdir -p "$OUT"
COMMON=(--data "$CIFAR" --time-budget "$BUDGET" --threads 1 --seed 0 --no-progress --overwrite)

train() {
    case $1 in
    vit)       $V train --recipe cifar10 "${COMMON[@]}" --output "$OUT/vit" ;;
    swin)      $V train --model swin_tiny_patch4_window7_224 --img-size 32 --set model_overrides.window_size=4 \
                   "${COMMON[@]}" --output "$OUT/swin" ;;
    swin_cifar) $V train --recipe cifar10_swin "${COMMON[@]}" --output "$OUT/swin_cifar" ;;
    mobilevit) $V train --model mobilevit_xxs --img-size 64 "${COMMON[@]}" --output "$OUT/mobilevit" ;;
    cct)       $V train "${COMMON[@]}" --output "$OUT/cct" ;;
    esac > "$OUT/$1.train.log" 2>&1
}

for w in "${WHICH[@]}"; do train "$w" & done
wait
for w in "${WHICH[@]}"; do
    $V export --checkpoint "$OUT/$w/model.safetensors" --output "$OUT/$w-int8.onnx" --overwrite --int8 --data "$CIFAR" \
        --num-images "$IMAGES" --json > "$OUT/$w-int8.json" 2> "$OUT/$w-int8.log" || true
    echo "== $w: $(tail -1 "$OUT/$w.train.log")"
    cat "$OUT/$w-int8.json"
done
