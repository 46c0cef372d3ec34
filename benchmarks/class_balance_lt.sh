#!/usr/bin/env bash
# recipe.class_balance on long-tailed CIFAR-10 (imbalance 100), tested on a balanced held-out split:
# none / loss / sampler at power 1 and 0.5, the same auto recipe and length for each (benchmarks/RESULTS.md,
# "Imbalanced classes").
#
#   OUT=/tmp/cb_lt SEEDS="0" PARALLEL=2 BUDGET=240 benchmarks/class_balance_lt.sh
#
# The recipe is the auto recipe's choice for this data on one CPU thread with a BUDGET-second budget, written once
# to $OUT/auto_lt.json with its length fixed in epochs (no --time-budget: every setting trains the same steps, so
# the results do not depend on the machine's load). Each setting trains on 1 thread; PARALLEL runs side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-/tmp/cb_lt}
SEEDS=${SEEDS:-0}
PARALLEL=${PARALLEL:-2}
BUDGET=${BUDGET:-240}
SETTINGS=${SETTINGS:-"none loss:1 loss:0.5 sampler:1 sampler:0.5"}
DATA=$OUT/cifar10_lt
mkdir -p "$OUT"
[ -d "$DATA" ] || $PY benchmarks/make_long_tail.py --source cifar10 --output "$DATA" --imbalance 100 \
    --test-per-class 1000 --seed 0
[ -f "$OUT/auto_lt.json" ] || $PY - "$DATA" "$BUDGET" > "$OUT/auto_lt.json" <<'EOF'
import json, sys
from vitlab.train.auto import choose_recipe, facts_for_source
from vitlab.train.hardware import Hardware
choice = choose_recipe(facts_for_source(sys.argv[1]), Hardware(cores=1, threads=1), time_budget_s=float(sys.argv[2]))
print(json.dumps({**choice.recipe.to_dict(), "name": "auto_lt"}, indent=2))
EOF

one() {  # SETTING SEED
    local mode=${1%%:*} power=${1#*:} name
    [ "$mode" = none ] && power=1
    name=$mode-p$power-s$2
    [ -f "$OUT/runs/$name/eval/metrics.json" ] && return
    /usr/bin/time -f "$name: %e s wall, %U s user" $PY -m vitlab train --data "$DATA" --recipe "$OUT/auto_lt.json" \
        --set class_balance=$mode --set class_balance_power=$power --seed "$2" --threads 1 --workers 0 \
        --no-progress --output "$OUT/runs/$name" --overwrite > "$OUT/$name.log" 2>&1
    $PY -m vitlab eval --checkpoint "$OUT/runs/$name/model.safetensors" --data "$DATA" --split test --threads 1 \
        --output "$OUT/runs/$name/eval" --overwrite --json > /dev/null 2>> "$OUT/$name.log"
}

jobs_=()
for seed in $SEEDS; do for s in $SETTINGS; do jobs_+=("$s $seed"); done; done
for job in "${jobs_[@]}"; do
    one $job &
    while [ "$(jobs -rp | wc -l)" -ge "$PARALLEL" ]; do sleep 2; done
done
wait

$PY - "$OUT" <<'EOF'
import json, math, pathlib, statistics, sys
rows = {}
for m in sorted(pathlib.Path(sys.argv[1], "runs").glob("*/eval/metrics.json")):
    r = json.loads(m.read_text())
    name = m.parent.parent.name
    setting, seed = name.rsplit("-s", 1)
    per = [v for v in r["per_class"].values() if v is not None]
    worst = min(per)
    rows.setdefault(setting, []).append((r["top1"], r["balanced_accuracy"], worst, min(r["per_class"], key=lambda k: r["per_class"][k] if r["per_class"][k] is not None else 2)))
print("| setting | seeds | top-1 | balanced accuracy | worst class |")
print("|---|---|---|---|---|")
for setting, vals in rows.items():
    f = lambda i: statistics.mean(v[i] for v in vals)
    print(f"| {setting} | {len(vals)} | {100 * f(0):.2f}% | {100 * f(1):.2f}% | {100 * f(2):.2f}% ({', '.join(v[3] for v in vals)}) |")
EOF
