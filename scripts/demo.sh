#!/usr/bin/env bash
# The main job on the bundled default: train a small ViT on scikit-learn's digits, report its test accuracy,
# predict a few held-out digits written as PNG files, then explain and analyse the trained model.
set -euo pipefail
cd "$(dirname "$0")/.."
VITLAB=.venv/bin/vitlab
RUN=${RUN:-runs/demo}

echo "== vitlab models 'vit_*_patch16_224'"
$VITLAB models 'vit_*_patch16_224'

echo "== vitlab train  (the digits recipe on the bundled digits; run directory: $RUN)"
$VITLAB train --output "$RUN" --overwrite

echo "== writing 8 held-out test digits as PNG files to $RUN/digits/"
RUN="$RUN" .venv/bin/python - <<'PY'
import os
from pathlib import Path

from PIL import Image

from vitlab.data import build_dataset

out = Path(os.environ["RUN"]) / "digits"
out.mkdir(parents=True, exist_ok=True)
ds = build_dataset("digits", split="test")
for i in range(0, 80, 10):  # spread over the test split
    img, label = ds[i]
    Image.fromarray(img[0].numpy()).resize((64, 64), Image.NEAREST).save(out / f"test{i:03d}_true{ds.classes[label]}.png")
PY

echo "== vitlab predict"
$VITLAB predict "$RUN"/digits/*.png --checkpoint "$RUN/model.safetensors" --topk 2

echo "== vitlab explain (attention rollout overlays)"
$VITLAB explain "$RUN"/digits/*.png --checkpoint "$RUN/model.safetensors" --output "$RUN/explain" --overwrite

echo "== vitlab analyze (attention distance, position similarity, embedding filters)"
$VITLAB analyze --checkpoint "$RUN/model.safetensors" --data digits --output "$RUN/analysis" --overwrite

echo
echo "checkpoint:        $RUN/model.safetensors"
echo "rollout overlays:  $RUN/explain/"
echo "analysis report:   $RUN/analysis/report.html"
