#!/usr/bin/env bash
# McMahan et al. 2017's MNIST experiments (docs/simulations.md, "Reproducing the paper"): rounds to
# 97% (2NN) and 99% (CNN) test accuracy, IID and pathological non-IID, from the shipped configs,
# each at every learning rate of LRS (the paper tuned eta on a multiplicative grid of 10^(1/3)).
# Usage: simulations/scripts/mcmahan-table.sh [DATA_DIR] [OUT_DIR]
#   CONFIGS="mnist-2nn-iid mnist-2nn-shards mnist-cnn-iid mnist-cnn-shards" (default: all four)
#   LRS="0.0215 0.0464 0.1" (default: each config's own lr)   FEDGE_SIM=path (default: target/release/fedge-sim)
set -euo pipefail
data=${1:-data}
out=${2:-runs/mcmahan}
sim=${FEDGE_SIM:-target/release/fedge-sim}
configs=${CONFIGS:-mnist-2nn-iid mnist-2nn-shards mnist-cnn-iid mnist-cnn-shards}
mkdir -p "$out"
printf '%-18s %-8s %-16s %-10s %-10s\n' config lr rounds_to_target best final_s
for c in $configs; do
  for lr in ${LRS:-default}; do
    args=(run --config "simulations/configs/$c.toml" --data-dir "$data" --out "$out/$c-lr$lr" --json)
    [ "$lr" = default ] || args+=(--lr "$lr")
    "$sim" "${args[@]}" > "$out/$c-lr$lr.json"
    python3 - "$out/$c-lr$lr.json" "$c" "$lr" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = s.get("rounds_to_target")
lr = s["config"].get("lr", sys.argv[3]) if isinstance(s.get("config"), dict) else sys.argv[3]
print(f"{sys.argv[2]:<18} {lr!s:<8} {('not reached in %d' % s['rounds']) if r is None else r!s:<16} {100*s['best_accuracy']:<10.2f} {s['wall_seconds']:<10.1f}")
PY
  done
done
