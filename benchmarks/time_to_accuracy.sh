#!/usr/bin/env bash
# Issue 14, time to accuracy: the exact commands, for a quiet machine (wall time of the whole command).
#
#   mnist-auto      vitlab train --data MNIST --time-budget 10m        target >= 99.0% test (t10k) in 10 min
#   mnist-recipe    vitlab train --data MNIST --recipe mnist            the shipped recipe, for comparison
#   cifar10-auto    vitlab train --data CIFAR --time-budget 30m        target >= 80% held-out in 30 min
#   cifar10-recipe  vitlab train --data CIFAR --recipe cifar10          the shipped recipe, for comparison
#
# The auto runs use no recipe: vitlab.train.auto chooses model, patch grid, batch, schedule and
# augmentation from the data and the machine, and --time-budget sizes the schedule from the measured
# speed of the first steps so that the cosine decay ends on time (recipe.json records the choice). The
# budget is the whole command's: start-up, data loading and the final evaluation are inside it.
#
# CIFAR-10 is the shared training split (train/<class>/*.jpg); the run holds out a seeded stratified 10%
# (val_fraction 0.1, seed 0), which is its test split. To evaluate on the official test split too, put its
# images in $CIFAR/test/<class>/*.jpg: the run then reports on test/ and the held-out part is validation.
#
# Usage: benchmarks/time_to_accuracy.sh [WHICH...]   (default: all four, in the order above)
# Env:   OUT (runs/time_to_accuracy), MNIST (/work/shared/data/mnist), TAR (the shared CIFAR-10 tar),
#        CIFAR (folder it is extracted to, default /tmp/tta_cifar10), VITLAB (command, default
#        ".venv/bin/vitlab"), THREADS (unset: the cores given), SEED (0),
#        SMOKE=1: each command briefly (recipes: 3 steps; auto: a 1-minute budget), on 50 images per
#        CIFAR class, to check that they start.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-runs/time_to_accuracy}
MNIST=${MNIST:-/work/shared/data/mnist}
TAR=${TAR:-/work/shared/data/cifar10-jpg-train.tar}
CIFAR=${CIFAR:-/tmp/tta_cifar10}
VITLAB=${VITLAB:-.venv/bin/vitlab}
SEED=${SEED:-0}
SMOKE=${SMOKE:-0}
read -r -a VITLAB_CMD <<< "$VITLAB"
WHICH=("$@")
[ ${#WHICH[@]} -gt 0 ] || WHICH=(mnist-auto mnist-recipe cifar10-auto cifar10-recipe)

COMMON=(--seed "$SEED" --overwrite)
[ -n "${THREADS:-}" ] && COMMON+=(--threads "$THREADS")
if [ "$SMOKE" = 1 ]; then
    OUT=${OUT}_smoke
    CIFAR=${CIFAR}_smoke
    RECIPE_LEN=(--steps 3)
    MNIST_BUDGET=1m
    CIFAR_BUDGET=1m
else
    RECIPE_LEN=()
    MNIST_BUDGET=10m
    CIFAR_BUDGET=30m
fi

extract_cifar() {
    [ -d "$CIFAR/train" ] && return
    mkdir -p "$CIFAR"
    if [ "$SMOKE" = 1 ]; then  # 50 images per class
        tar -xf "$TAR" -C "$CIFAR" --wildcards 'train/*/00[0-4]?.jpg'
    else
        tar -xf "$TAR" -C "$CIFAR"
    fi
}

run() {  # run NAME ARGS...: one timed command; its log, wall time and result line under $OUT
    local name=$1; shift
    local cmd=("${VITLAB_CMD[@]}" train --output "$OUT/$name" "${COMMON[@]}" "$@")
    mkdir -p "$OUT"
    echo "== $name: ${cmd[*]}"
    local t0 t1
    t0=$(date +%s.%N)
    "${cmd[@]}" 2>&1 | tee "$OUT/$name.log"
    t1=$(date +%s.%N)
    local wall
    wall=$(python3 -c "print(f'{$t1 - $t0:.1f}')")
    local acc
    acc=$(python3 -c "import json,sys; r=json.load(open('$OUT/$name/results.json')); print(f\"{100*r['test']['top1']:.2f}% on {r['test']['samples']} images, {r['steps']} steps\")")
    printf '%s\t%s s\t%s\t%s\n' "$name" "$wall" "$acc" "${cmd[*]}" | tee -a "$OUT/summary.tsv"
}

for which in "${WHICH[@]}"; do
    case $which in
        mnist-auto)     run mnist-auto --data "$MNIST" --time-budget "$MNIST_BUDGET" ;;
        mnist-recipe)   run mnist-recipe --data "$MNIST" --recipe mnist "${RECIPE_LEN[@]}" ;;
        cifar10-auto)   extract_cifar; run cifar10-auto --data "$CIFAR" --time-budget "$CIFAR_BUDGET" ;;
        cifar10-recipe) extract_cifar; run cifar10-recipe --data "$CIFAR" --recipe cifar10 "${RECIPE_LEN[@]}" ;;
        *) echo "unknown run $which (mnist-auto, mnist-recipe, cifar10-auto, cifar10-recipe)" >&2; exit 2 ;;
    esac
done
echo "summary: $OUT/summary.tsv"
