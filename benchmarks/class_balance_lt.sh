#!/usr/bin/env bash
# recipe.class_balance on long-tailed CIFAR-10 (imbalance 100), tested on a balanced held-out split:
# none / loss / sampler at power 1 and 0.5, the same auto recipe and length for each (benchmarks/RESULTS.md,
# "Imbalanced classes").
#
#   OUT=/tmp/cb_lt SEEDS="0" PARALLEL=2 BUDGET=240 benchmarks/class_balance_lt.sh
#   OUT=/tmp/cb_lt10 IMBALANCE=10 SETTINGS="none sampler:0.5" benchmarks/class_balance_lt.sh
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
IMBALANCE=${IMBALANCE:-100}
DATA=$OUT/cifar10_lt
mkdir -p "$OUT"
[ -d "$DATA" ] || $PY benchmarks/make_long_tail.py --source cifar10 --output "$DATA" --imbalance "$IMBALANCE" \
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

$PY - "$OUT" "$DATA" <<'EOF'
# per setting (mean over seeds): top-1 on the balanced test split (= its balanced accuracy: 1,000 images a class),
# the worst class's accuracy (and which), the head (3 largest) and tail (3 smallest) classes' mean accuracy, and the
# accuracy a test set distributed as the training data would give (each class's accuracy weighted by its images)
import json, pathlib, statistics, sys
out, data = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
counts = {d.name: sum(1 for _ in d.iterdir()) for d in (data / "train").iterdir()}
order = sorted(counts, key=counts.get, reverse=True)
rows = {}
for m in sorted((out / "runs").glob("*/eval/metrics.json")):
    r = json.loads(m.read_text())
    setting = m.parent.parent.name.rsplit("-s", 1)[0]
    acc = r["per_class"]
    worst = min(acc, key=acc.get)
    rows.setdefault(setting, []).append({
        "top1": r["top1"], "balanced": r["balanced_accuracy"], "worst": acc[worst], "worst_name": worst,
        "head": statistics.mean(acc[c] for c in order[:3]), "tail": statistics.mean(acc[c] for c in order[-3:]),
        "lt": sum(acc[c] * counts[c] for c in counts) / sum(counts.values())})
print("| setting | seeds | top-1 (balanced test) | balanced accuracy | worst class | head 3 | tail 3 | "
      "as distributed in training |")
print("|---|---|---|---|---|---|---|---|")
for setting, vals in rows.items():
    def f(k):
        return 100 * statistics.mean(v[k] for v in vals)
    print(f"| {setting} | {len(vals)} | {f('top1'):.2f}% | {f('balanced'):.2f}% | {f('worst'):.2f}% "
          f"({', '.join(v['worst_name'] for v in vals)}) | {f('head'):.2f}% | {f('tail'):.2f}% | {f('lt'):.2f}% |")
EOF
