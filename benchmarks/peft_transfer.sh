#!/usr/bin/env bash
# Fine-tuning methods on a transfer, on the CPU: a small ViT pre-trained by vitlab on CIFAR-10 for a few minutes
# (--time-budget PRE_BUDGET: the cosine schedule sized to end on time),
# then fine-tuned onto a small MNIST folder (N training images per digit, MNIST's 10,000 test images) by
#   full fine-tuning | partial (embedding and the first 3 of 6 blocks frozen) | LoRA r=8 on qkv | LoRA r=8 on all
#   | linear probe (the head alone)
# plus the same architecture trained from scratch on the small folder, each with the same steps, batch, schedule
# and seed. Learning rates, fixed beforehand (not tuned on these runs): 1e-3 for full / partial fine-tuning and from
# scratch, 3e-3 for LoRA (adapters usually take a higher one; Hugging Face's LoRA tutorial uses 5e-3), 1e-2 for the
# linear probe; LRS="a b ..." runs every method at each of them instead, and picks by the held-out 10% of the
# training folder (never by the test set). results.json of each run holds val / test top-1 and the trainable
# parameters.
#
# Usage: benchmarks/peft_transfer.sh [OUT]   (default OUT=runs/peft_transfer)
# Env:   CIFAR (/tmp/cifar_peft: the tar extracted there), SMALL (/tmp/mnist_small), PER_DIGIT (100),
#        PRE_BUDGET (8m), STEPS (200), LRS (""), THREADS (2), PYTHON (python), VITLAB
#        ("$PYTHON -m vitlab").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/peft_transfer}
CIFAR=${CIFAR:-/tmp/cifar_peft}
SMALL=${SMALL:-/tmp/mnist_small}
PER_DIGIT=${PER_DIGIT:-100}
PRE_BUDGET=${PRE_BUDGET:-8m}
STEPS=${STEPS:-200}
LRS=${LRS:-}
THREADS=${THREADS:-2}
PYTHON=${PYTHON:-python}
VITLAB=${VITLAB:-"$PYTHON -m vitlab"}
mkdir -p "$OUT"

[ -d "$CIFAR/train" ] || { mkdir -p "$CIFAR"; tar -xf /work/shared/data/cifar10-jpg-train.tar -C "$CIFAR"; }
[ -d "$SMALL/train" ] || $PYTHON benchmarks/make_mnist_subset.py --mnist /work/shared/data/mnist --output "$SMALL" \
    --train "$PER_DIGIT"

timed() {  # timed NAME CMD...: run CMD, keep its log and its wall seconds
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name $((SECONDS - t0))" >> "$OUT/wall_seconds.txt"
}

# 1. pre-training: the cifar10 recipe (6 blocks, width 64, 4x4 patches at 32 px) in PRE_BUDGET
[ -f "$OUT/pretrain/results.json" ] || timed pretrain $VITLAB train --data "$CIFAR" --recipe cifar10 \
    --time-budget "$PRE_BUDGET" --threads "$THREADS" --no-progress --output "$OUT/pretrain" --overwrite

# 2. fine-tuning: AdamW, batch 64, STEPS steps, 10% warm-up, cosine to 0, no augmentation (digits: no flips)
COMMON=(--data "$SMALL" --steps "$STEPS" --batch-size 64 --threads "$THREADS" --no-progress --overwrite
        --set global_batch=none --set optimizer=adamw --set weight_decay=0.05 --set warmup_steps=$((STEPS / 10))
        --set augment=false --set checkpoint_every=0 --set eval_every_epochs=1000 --set label_smoothing=0.1)
declare -A METHOD=([full]="" [partial3]="--set freeze_blocks=3" [lora_qkv]="--set lora_rank=8 --set lora_targets=qkv"
                   [lora_all]="--set lora_rank=8 --set lora_targets=all" [probe]="--set freeze=backbone")
declare -A LR=([full]=0.001 [partial3]=0.001 [lora_qkv]=0.003 [lora_all]=0.003 [probe]=0.01 [scratch]=0.001)
for m in full partial3 lora_qkv lora_all probe; do
    for lr in ${LRS:-${LR[$m]}}; do
        # shellcheck disable=SC2086
        timed "${m}_lr$lr" $VITLAB finetune --from "$OUT/pretrain/model.safetensors" "${COMMON[@]}" --set lr="$lr" \
            ${METHOD[$m]} --output "$OUT/${m}_lr$lr"
    done
done
# 3. the same architecture from scratch on the small folder (at 32 px, as the fine-tunes)
for lr in ${LRS:-${LR[scratch]}}; do
    timed "scratch_lr$lr" $VITLAB train --recipe cifar10 --img-size 32 "${COMMON[@]}" --set lr="$lr" \
        --set zero_init_head=false --output "$OUT/scratch_lr$lr"
done

$PYTHON - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
walls = dict(line.split() for line in (out / "wall_seconds.txt").read_text().splitlines())
pre = json.loads((out / "pretrain" / "results.json").read_text())
print(f"pre-training: CIFAR-10 held-out top-1 {100 * pre['test']['top1']:.2f}% in {walls['pretrain']} s")
print("| method | trainable params | fraction | lr (by val) | val top-1 | test top-1 | wall s | test top-1 at each lr |")
print("|---|---|---|---|---|---|---|---|")
runs = {}
for d in sorted(p for p in out.glob("*_lr*") if p.is_dir()):
    r = json.loads((d / "results.json").read_text())
    method, lr = d.name.rsplit("_lr", 1)
    runs.setdefault(method, []).append((float(lr), r, walls.get(d.name, "?")))
for method in ("full", "partial3", "lora_qkv", "lora_all", "probe", "scratch"):
    rows = sorted(runs.get(method, []), key=lambda t: t[0])
    if not rows:
        continue
    lr, best, wall = max(rows, key=lambda t: (t[1]["val"]["val_top1"], -t[0]))
    each = ", ".join(f"{l:g}: {100 * r['test']['top1']:.2f}" for l, r, _ in rows)
    print(f"| {method} | {best.get('trainable_params', 0):,} | {100 * best.get('trainable_fraction', 1):.2f}% | {lr:g} | "
          f"{100 * best['val']['val_top1']:.2f}% | {100 * best['test']['top1']:.2f}% | {wall} | {each} |")
PY
