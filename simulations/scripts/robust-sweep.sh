#!/usr/bin/env bash
# Robust aggregation under attack (issue 15): the final test accuracy of each strategy against
# each attack, for each dataset and partition, written as markdown tables.
#
#   usage: simulations/scripts/robust-sweep.sh [OUT_DIR=runs/robust-sweep] > table.md
#
# Build first: cargo build -p fedge-sim (the dev profile is optimised). Runs already in OUT_DIR
# are kept, so an interrupted sweep resumes. Everything below can be narrowed from the
# environment, e.g. DATASETS=mnist PARTITIONS=iid FRACTIONS="0 0.2". Each STRATEGIES entry is
# NAME or NAME:flag=value,... (e.g. centered-clip:bucket-size=2, as noniid-optimisers.sh spells
# them); the table's column is named by the entry.
set -euo pipefail
OUT=${1:-runs/robust-sweep}
SIM=${SIM:-target/debug/fedge-sim}
DATA_DIR=${DATA_DIR:-${FEDGE_DATA_DIR:-../shared/data}}
DATASETS=${DATASETS:-mnist fashion-mnist}
PARTITIONS=${PARTITIONS:-iid dirichlet}
FRACTIONS=${FRACTIONS:-0 0.1 0.2 0.3}
ATTACKS=${ATTACKS:-sign-flip scale noise label-flip little-is-enough}
STRATEGIES=${STRATEGIES:-fedavg median trimmed-mean krum multi-krum norm-bound centered-clip}
ROUNDS=${ROUNDS:-20}
SEED=${SEED:-1}
# 100 devices, 20 a round, one local epoch in batches of 10; Dirichlet(0.3) for non-IID.
COMMON=(--devices 100 --fraction 0.2 --rounds "$ROUNDS" --epochs 1 --batch-size 10 --lr 0.05
        --eval-every "$ROUNDS" --alpha 0.3 --seed "$SEED" --quiet)
# An entry's run directory suffix: centered-clip:bucket-size=2 -> centered-clip_bucket-size_2
# (a plain name is its own suffix, so earlier sweeps' runs are still found).
dir_name() { echo "$1" | tr ':,=' '_._'; }
mkdir -p "$OUT"
start=$(date +%s)
runs=0
for ds in $DATASETS; do
  for part in $PARTITIONS; do
    for frac in $FRACTIONS; do
      attacks=$ATTACKS
      [ "$frac" = 0 ] && attacks=none
      for attack in $attacks; do
        for entry in $STRATEGIES; do
          name=${entry%%:*}
          extra=()
          if [ "$entry" != "$name" ]; then
            IFS=, read -ra kv <<< "${entry#*:}"
            for f in "${kv[@]}"; do extra+=("--${f%%=*}" "${f#*=}"); done
          fi
          dir="$OUT/$ds-$part-$attack-$frac-$(dir_name "$entry")"
          [ -f "$dir/summary.json" ] && continue
          [ "$attack" != none ] && extra+=(--attack "$attack" --attackers "$frac")
          "$SIM" run --dataset "$ds" --data-dir "$DATA_DIR" --partition "$part" --strategy "$name" \
            "${COMMON[@]}" "${extra[@]}" --out "$dir" >&2
          runs=$((runs + 1))
        done
      done
    done
  done
done
echo "$runs runs in $(( $(date +%s) - start )) s" >&2
python3 - "$OUT" "$STRATEGIES" <<'PY'
import json, os, sys
out, strategies = sys.argv[1], sys.argv[2].split()
# Each entry's directory suffix, as dir_name writes it.
suffix = {e: e.translate(str.maketrans(":,=", "_._")) for e in strategies}
rows = {}
for name in sorted(os.listdir(out)):
    path = os.path.join(out, name, "summary.json")
    if not os.path.exists(path):
        continue
    s = json.load(open(path))
    # ds-part-attack-frac-entry; names hold dashes, so split from known pieces.
    for strat in sorted(strategies, key=lambda e: len(suffix[e]), reverse=True):  # multi-krum before krum
        if name.endswith("-" + suffix[strat]):
            head = name[: -len(suffix[strat]) - 1]
            break
    else:
        continue
    ds_part, frac = head.rsplit("-", 1)
    for part in ("iid", "dirichlet", "shards"):
        i = ds_part.find("-" + part + "-")
        if i >= 0:
            ds, attack = ds_part[:i], ds_part[i + len(part) + 2:]
            break
    rows.setdefault((ds, part), {}).setdefault((attack, float(frac)), {})[strat] = s["final_accuracy"]
for (ds, part), table in sorted(rows.items()):
    label = {"iid": "IID", "dirichlet": "Dirichlet(0.3)"}.get(part, part)
    print(f"\n**{ds}, {label}** (final test accuracy, %)\n")
    print("| attack | attackers | " + " | ".join(strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    order = sorted(table, key=lambda k: (k[0] != "none", k[0], k[1]))
    for attack, frac in order:
        accs = table[(attack, frac)]
        cells = [f"{100 * accs[s]:.1f}" if s in accs else "" for s in strategies]
        print(f"| {attack} | {int(round(100 * frac))}% | " + " | ".join(cells) + " |")
PY
