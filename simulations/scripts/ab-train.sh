#!/usr/bin/env bash
# A/B two fedge-sim binaries on the CNN training step in one run: they alternate N times
# (2 s measurements, one thread, no PyTorch) and the best samples/s of each per batch is kept,
# so machine drift hits both alike.
#   usage: ab-train.sh OLD_FEDGE_SIM NEW_FEDGE_SIM [N=4]   (BATCHES=10,64 by default)
# Build the two with `cargo build -p fedge-sim` at each commit and copy target/debug/fedge-sim.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD_FEDGE_SIM NEW_FEDGE_SIM [N]" >&2; exit 2; }
A=$1 B=$2 N=${3:-4}
for _ in $(seq "$N"); do
  for v in A B; do
    bin=$A; [ "$v" = B ] && bin=$B
    "$bin" bench-train --models cnn --batches "${BATCHES:-10,64}" --threads 1 --seconds 2 --repeat 1 \
      --no-torch --json | sed "s/^/$v /"
  done
done | python3 -c '
import sys, json
best = {}
for line in sys.stdin:
    v, j = line.split(" ", 1)
    r = json.loads(j)
    k = (v, r["batch"])
    best[k] = max(best.get(k, 0), r["fedge"])
for (v, batch), s in sorted(best.items()):
    print(f"{v} batch {batch}: {s:.0f} samples/s")
'
