#!/usr/bin/env bash
# The accuracy / epsilon trade-off of central DP-FedAvg on full MNIST (docs/privacy.md):
# simulations/configs/mnist-2nn-dp.toml at several noise multipliers, plus clipping alone.
# Usage: simulations/scripts/dp-tradeoff.sh [DATA_DIR] [OUT_DIR]   (release build first)
set -euo pipefail
data=${1:-data}
out=${2:-runs/dp-tradeoff}
sim=${FEDGE_SIM:-target/release/fedge-sim}
cfg=simulations/configs/mnist-2nn-dp.toml
mkdir -p "$out"
printf '%-8s %-10s %-10s %-8s\n' z accuracy epsilon seconds
for z in none 2.0 1.5 1.0 0.7 0.5; do
  if [ "$z" = none ]; then
    # Clipping alone: a config without noise_multiplier.
    grep -v '^noise_multiplier' "$cfg" > "$out/clip-only.toml"
    "$sim" run --config "$out/clip-only.toml" --data-dir "$data" --out "$out/z-$z" --json > "$out/z-$z.json"
  else
    "$sim" run --config "$cfg" --data-dir "$data" --noise-multiplier "$z" --out "$out/z-$z" --json > "$out/z-$z.json"
  fi
  python3 - "$out/z-$z.json" "$z" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
eps = s.get("epsilon")
print(f"{sys.argv[2]:<8} {100*s['final_accuracy']:<10.2f} {('inf' if eps is None else f'{eps:.3f}'):<10} {s['wall_seconds']:<8.1f}")
PY
done
