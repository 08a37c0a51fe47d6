#!/usr/bin/env bash
# FedAvg against FedProx and the server optimisers on McMahan et al.'s pathological non-IID
# MNIST split (2 shards of one label each per device): rounds to TARGET test accuracy (issue 15).
#
#   usage: simulations/scripts/noniid-optimisers.sh [OUT_DIR=runs/noniid-optimisers]
#
# Build first: cargo build -p fedge-sim. Each STRATEGY entry is NAME or NAME:flag=value,...
# (e.g. fedadam:server-lr=0.003). Runs already in OUT_DIR are kept.
set -euo pipefail
OUT=${1:-runs/noniid-optimisers}
SIM=${SIM:-target/debug/fedge-sim}
DATA_DIR=${DATA_DIR:-${FEDGE_DATA_DIR:-../shared/data}}
TARGET=${TARGET:-0.95}
ROUNDS=${ROUNDS:-150}
SEED=${SEED:-1}
STRATEGIES=${STRATEGIES:-fedavg fedavgm:server-lr=0.3 fedprox:proximal-mu=0.1 fedadam fedyogi fedadagrad}
mkdir -p "$OUT"
printf '| strategy | rounds to %s%% | best accuracy %% | wall s |\n|---|---|---|---|\n' "$(python3 -c "print(round($TARGET*100,1))")"
for entry in $STRATEGIES; do
  name=${entry%%:*}
  flags=()
  if [ "$entry" != "$name" ]; then
    IFS=, read -ra kv <<< "${entry#*:}"
    for f in "${kv[@]}"; do flags+=("--${f%%=*}" "${f#*=}"); done
  fi
  dir="$OUT/$(echo "$entry" | tr ':,=' '_._')"
  if [ ! -f "$dir/summary.json" ]; then
    "$SIM" run --config simulations/configs/mnist-2nn-shards.toml --data-dir "$DATA_DIR" --strategy "$name" \
      "${flags[@]}" --rounds "$ROUNDS" --target-accuracy "$TARGET" --seed "$SEED" --quiet --out "$dir" >&2
  fi
  python3 - "$dir/summary.json" "$entry" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
r = s["rounds_to_target"]
print(f"| {sys.argv[2]} | {r if r is not None else 'not in %d' % s['rounds']} | {100 * s['best_accuracy']:.2f} | {s['wall_seconds']:.0f} |")
PY
done
