#!/bin/bash
# squash (the auto recipe now) vs the square centre crop (before), back to back, 2 min each, one thread
# usage: benchmarks/auto_recipe_aspect.sh DATA   (DATA: a folder of 2:1 pictures, e.g. two MNIST digits side by side)
DATA=${1:?a folder of non-square pictures}
mkdir -p /tmp/meas && cd /tmp/meas
V=${VITLAB:-vitlab}
for rep in 1 2; do
  for arm in squash center; do
    extra=()
    if [ $arm = center ]; then extra=(--set model_overrides.crop_mode=center --set "ratio=[0.8,1.25]"); fi
    OMP_NUM_THREADS=1 $V train --data "$DATA" --time-budget 2m --threads 1 --seed 0 \
      --output runs/${arm}_$rep --overwrite --no-progress "${extra[@]}" > runs_${arm}_$rep.log 2>&1
    echo "$arm $rep $(grep -o 'test accuracy [0-9.]*%.*steps' runs_${arm}_$rep.log)"
  done
done
