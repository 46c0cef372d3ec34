#!/usr/bin/env bash
# Issue 11, "what must be measured": self-supervised pre-training on CIFAR-10 (labels ignored), then the
# same fine-tuning budget from scratch / after MPP / after MAE, on a seeded 10% labelled subset and on all
# labels, all tested on the same held-out 5,000 images; DINO's k-NN accuracy before and after pre-training.
#
# NOT run by the helper that wrote it (the machine was shared); every arm is one command below, about
# 15-25 min each on one CPU thread. Run from the repository root:
#     bash benchmarks/ssl_cifar10.sh            # all arms, sequentially (~3.5 h)
#     ARMS="prep scratch10 mae mae10" bash benchmarks/ssl_cifar10.sh
#     EXTRA="--steps 2" OUT=/tmp/ssl_smoke bash benchmarks/ssl_cifar10.sh   # smoke test of every command
# Two chains side by side, one thread each (what RESULTS.md reports; ~100 min):
#     ARMS=prep bash benchmarks/ssl_cifar10.sh
#     OMP_NUM_THREADS=1 ARMS="mae mae10 mae100 scratch10 scratch100" bash benchmarks/ssl_cifar10.sh &
#     OMP_NUM_THREADS=1 ARMS="dino mpp mpp10 mpp100" bash benchmarks/ssl_cifar10.sh
# Results: runs under $OUT/*/results.json; k-NN lines in $OUT/*.knn.txt.
set -euo pipefail
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src}
OUT=${OUT:-/tmp/ssl_cifar10}
DATA=$OUT/data
SEED=${SEED:-0}
ARMS=${ARMS:-"prep scratch10 scratch100 mpp mpp10 mpp100 mae mae10 mae100 dino probes"}
V="$PY -m vitlab.cli.main"
# the cifar10 recipe's model (6 x 64, 4x4 patches at 32 px); pre-training and fine-tuning use it unchanged
EXTRA=${EXTRA:-}
PRE="--recipe cifar10 --set val_fraction=0 --set eval_every_epochs=100 --seed $SEED --no-progress $EXTRA"
FT="--recipe cifar10 --set val_fraction=0 --seed $SEED --no-progress $EXTRA"

run() { echo "== $*"; local t=$SECONDS; "$@"; echo "== $((SECONDS - t)) s wall"; }

for arm in $ARMS; do
  case $arm in
  prep)  # 45,000 training images / 5,000 held out (seeded, stratified); a 10% labelled subset of the 45,000
    mkdir -p $OUT/raw && tar -xf ../shared/data/cifar10-jpg-train.tar -C $OUT/raw
    $PY - "$OUT" "$SEED" <<'PYEOF'
import os, sys
from pathlib import Path
from vitlab.data.folder import scan_folder
from vitlab.data.splits import stratified_split
out, seed = Path(sys.argv[1]), int(sys.argv[2])
paths, labels, classes = scan_folder(out / "raw" / "train")
train, test = stratified_split(labels, 0.1, seed)          # 45,000 / 5,000
lab10, _ = stratified_split([labels[i] for i in train], 0.9, seed + 1)  # 4,500 of the 45,000
def link(root, idx):
    for i in idx:
        d = root / classes[labels[i]]; d.mkdir(parents=True, exist_ok=True)
        dst = d / Path(paths[i]).name
        if not dst.exists(): os.symlink(os.path.abspath(paths[i]), dst)
link(out / "data/all/train", train); link(out / "data/all/test", test)
link(out / "data/lab10/train", [train[i] for i in lab10]); link(out / "data/lab10/test", test)
print(len(train), len(test), len(lab10))
PYEOF
    ;;
  # ---- from scratch, the fine-tuning budget (the cifar10 recipe: 9 epochs over the labelled images;
  # the 10% arms run 90 epochs of 35 steps with the warm-up stretched to the same ~175 steps)
  scratch10)  run $V train $FT --data folder:$DATA/lab10 --set epochs=90 --set warmup_epochs=5 --output $OUT/scratch10 ;;  # same steps as 9 ep x 45k
  scratch100) run $V train $FT --data folder:$DATA/all --output $OUT/scratch100 ;;
  # ---- masked patch prediction: ~20 min of pre-training on the 45,000 unlabelled images
  mpp)    run $V pretrain --method mpp $PRE --data folder:$DATA/all --epochs 12 --set lr=1e-3 --set weight_decay=0.0 \
            --set scale=0.6,1.0 --output $OUT/mpp ;;
  mpp10)  run $V finetune --from $OUT/mpp/model.safetensors $FT --data folder:$DATA/lab10 --set epochs=90 --set warmup_epochs=5 --output $OUT/mpp10 ;;
  mpp100) run $V finetune --from $OUT/mpp/model.safetensors $FT --data folder:$DATA/all --output $OUT/mpp100 ;;
  # ---- MAE: 75% masking, decoder 64 x 2, normalised pixels, AdamW betas (0.9, 0.95); the encoder sees 16 of 64 patches
  mae)    run $V pretrain --method mae $PRE --data folder:$DATA/all --epochs 30 --set lr=1.5e-3 --set betas=0.9,0.95 \
            --set scale=0.2,1.0 --opt decoder_dim=64 --opt decoder_depth=2 --opt decoder_heads=2 --output $OUT/mae ;;
  mae10)  run $V finetune --from $OUT/mae/model.safetensors $FT --data folder:$DATA/lab10 --set epochs=90 --set warmup_epochs=5 --output $OUT/mae10 ;;
  mae100) run $V finetune --from $OUT/mae/model.safetensors $FT --data folder:$DATA/all --output $OUT/mae100 ;;
  # ---- DINO: 2 x 32 px + 4 x 16 px crops, K 4096, teacher k-NN before (random init: one step at lr 1e-12) and after.
  # DINO's own crop ranges (global 0.4-1, aspect 3/4-4/3), as in the recorded run: pretrain now applies the
  # cifar10 recipe's scale / ratio to DINO's crops, so they are set back here
  dino)
    DINO_CROPS="--set scale=0.4,1.0 --set ratio=0.75,1.3333333333333333"
    run $V pretrain --method dino $PRE $DINO_CROPS --data folder:$DATA/all --epochs 4 --set lr=5e-4 --set weight_decay=0.04 \
      --set warmup_epochs=1 --opt out_dim=4096 --opt num_local=4 --opt local_size=16 --opt momentum=0.99 --output $OUT/dino
    $V pretrain --method dino $PRE $DINO_CROPS --data folder:$DATA/all --steps 1 --set lr=1e-12 --set warmup_epochs=0 \
      --opt out_dim=4096 --opt num_local=4 --opt local_size=16 --output $OUT/dino_init >/dev/null
    for ck in dino_init/teacher dino/teacher dino/model; do  # DINO's k-NN (k 20, T 0.07) from all 45,000 training images
      $V eval --checkpoint $OUT/$ck.safetensors --data folder:$DATA/all --split test --val-fraction 0 \
        --output $OUT/knn_${ck//\//_} | tee $OUT/${ck//\//_}.knn.txt
    done ;;
  # ---- frozen features of every pre-trained backbone: k-NN and MAE's linear probe (non-affine BatchNorm + linear,
  # 90 epochs over the cached features), from all 45,000 training images; dino_init's teacher is the random init
  probes)
    for ck in dino_init/teacher mpp/model mae/model dino/teacher; do
      for protocol in knn linear; do
        $V eval --checkpoint $OUT/$ck.safetensors --data folder:$DATA/all --split test --val-fraction 0 \
          --protocol $protocol --output $OUT/probe_${protocol}_${ck//\//_} | tee $OUT/${ck//\//_}.$protocol.txt
      done
    done ;;
  esac
done
