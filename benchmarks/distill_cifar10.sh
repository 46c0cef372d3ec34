#!/usr/bin/env bash
# Issue 5, "Measured": DeiT hard distillation through the distillation token on CIFAR-10, on the CPU.
#
#   1. a small CNN teacher (resnet18 with a 3x3 stride-1 stem and 16-32-64-128 channels) trained by vitlab;
#   2. a small distilled DeiT student (img 32, patch 4, dim 128, depth 4, 4 heads) trained twice with the
#      same recipe (src/vitlab/train/recipes/cifar10_distill.json), epochs, seed and therefore the same
#      initial weights and batch order:
#        (a) --teacher TEACHER --distill hard  (class head: labels, distillation head: teacher argmax, 1:1);
#        (b) labels only, same distilled architecture (both heads averaged, as at inference);
#   3. all three checkpoints evaluated with `vitlab eval` on the same seeded 10% held-out split (5,000 images).
#
# Usage: benchmarks/distill_cifar10.sh [OUT]   (defaults: OUT=runs/distill_cifar10)
# Env:   TEACHER_EPOCHS (6), STUDENT_EPOCHS (4), DATA (/tmp/cifar_d), TAR (the shared CIFAR-10 tar),
#        VITLAB (vitlab executable). One torch thread and one loader worker: the machine is shared.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-runs/distill_cifar10}
DATA=${DATA:-/tmp/cifar_d}
TAR=${TAR:-/work/shared/data/cifar10-jpg-train.tar}
VITLAB=${VITLAB:-.venv/bin/vitlab}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-6}
STUDENT_EPOCHS=${STUDENT_EPOCHS:-4}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

# train/<class>/NNNN.jpg, 50,000 images; the held-out part is a seeded stratified 10% of it (val_fraction 0.1,
# seed 0: the recipe's values, and those of `vitlab eval` below).
if [ ! -d "$DATA/train" ]; then
    mkdir -p "$DATA"
    tar -xf "$TAR" -C "$DATA"
fi
mkdir -p "$OUT"

timed() {  # timed NAME CMD...: run CMD, keep its log and its wall time in seconds
    local name=$1; shift
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    echo "$name $((SECONDS - t0))" >> "$OUT/wall_seconds.txt"
}

# 1. teacher: the same recipe with the student's model overrides replaced by the ResNet's.
timed teacher "$VITLAB" train --model resnet18 --data "$DATA" --recipe cifar10_distill --epochs "$TEACHER_EPOCHS" \
    --set 'model_overrides={"stem":"small","stem_chs":16,"channels":[16,32,64,128]}' \
    --output "$OUT/teacher" --overwrite --no-progress

# 2a. student with hard distillation through the distillation token.
timed student_hard "$VITLAB" train --data "$DATA" --recipe cifar10_distill --epochs "$STUDENT_EPOCHS" \
    --teacher "$OUT/teacher/model.safetensors" --distill hard \
    --output "$OUT/student_hard" --overwrite --no-progress

# 2b. the same student, labels only.
timed student_plain "$VITLAB" train --data "$DATA" --recipe cifar10_distill --epochs "$STUDENT_EPOCHS" \
    --output "$OUT/student_plain" --overwrite --no-progress

# 3. the same held-out split for all three.
for run in teacher student_hard student_plain; do
    "$VITLAB" eval --checkpoint "$OUT/$run/model.safetensors" --data "$DATA" --split val --val-fraction 0.1 \
        --seed 0 --workers 1 --json > "$OUT/eval_$run.json"
    echo "$run: $(cat "$OUT/eval_$run.json")"
done
cat "$OUT/wall_seconds.txt"
