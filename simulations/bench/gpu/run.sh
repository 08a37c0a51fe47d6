#!/usr/bin/env bash
# Fedge's GPU path on a machine with an NVIDIA GPU, unattended: first step cold and warm and
# steady step time of the CNN and 2NN at batch 10/64/256 on burn-wgpu (Vulkan), beside PyTorch
# CUDA in the same run (docs/gpu.md, "On a real GPU"). Writes OUT/*.jsonl and OUT/summary.md.
#
#   simulations/bench/gpu/run.sh [OUT]        # default OUT: runs/gpu-bench
#
# Needs: the Vulkan loader (libvulkan1) and the NVIDIA driver's Vulkan ICD; a fedge-sim built
# with the wgpu feature (FEDGE_SIM=path, or it is built here: cargo build --release -p fedge-sim
# --features wgpu); python3 with torch for CUDA (TORCH_PYTHON=path; skipped when absent).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out="${1:-runs/gpu-bench}"
mkdir -p "$out"
sim="${FEDGE_SIM:-target/release/fedge-sim}"
if [ ! -x "$sim" ]; then
  cargo build --release -p fedge-sim --features wgpu
fi
models="${MODELS:-cnn,2nn}"
batches="${BATCHES:-10,64,256}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt" || true

# Cold: the drivers' shader caches in an empty folder (Mesa's and NVIDIA's), so every kernel
# compiles. Warm: a second process with the cache the first left, as a restarted device has it.
cache="$(mktemp -d)"
export MESA_SHADER_CACHE_DIR="$cache" __GL_SHADER_DISK_CACHE=1 __GL_SHADER_DISK_CACHE_PATH="$cache" \
  __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1
"$sim" bench-gpu --backend wgpu --models "$models" --batches "$batches" | tee "$out/wgpu-cold.jsonl"
"$sim" bench-gpu --backend wgpu --models "$models" --batches "$batches" --devices "${DEVICES:-1,8,64}" | tee "$out/wgpu-warm.jsonl"
rm -rf "$cache"

py="${TORCH_PYTHON:-python3}"
if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  "$py" simulations/bench/gpu/torch_cuda_step.py --models "$models" --batches "$batches" --devices "${DEVICES:-1,8,64}" \
    | tee "$out/torch-cuda.jsonl"
else
  echo "no PyTorch with CUDA ($py): skipping the reference" >&2
  : > "$out/torch-cuda.jsonl"
fi

python3 - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
cold, warm, torch = load("wgpu-cold.jsonl"), load("wgpu-warm.jsonl"), load("torch-cuda.jsonl")
key = lambda r: (r["model"], r["batch"])
t = {key(r): r for r in torch if "batch" in r}
w = {key(r): r for r in warm if "batch" in r}
lines = ["| model | batch | first step cold (ms) | first step warm (ms) | wgpu ms/step | torch CUDA ms/step | wgpu / torch speed |",
         "|---|---|---|---|---|---|---|"]
for r in cold:
    k = key(r); wr = w.get(k, {}); tr = t.get(k)
    ratio = f"{tr['ms_per_step'] / wr['ms_per_step']:.2f}x" if tr and wr else "-"
    lines.append(f"| {k[0]} | {k[1]} | {r['first_step_ms']:.0f} | {wr.get('first_step_ms', float('nan')):.0f} | "
                 f"{wr.get('ms_per_step', float('nan')):.3f} | {tr['ms_per_step'] if tr else '-'} | {ratio} |")
lines += ["", "| model | devices | Fedge, one launch (samples/s) | PyTorch one at a time (samples/s) | ratio |", "|---|---|---|---|---|"]
one_at_a_time = {(r["model"], r["devices"]): r for r in torch if "devices" in r}
for r in warm:
    if "devices" in r:
        tr = one_at_a_time.get((r["model"], r["devices"]))
        ratio = f"{r['samples_per_s'] / tr['samples_per_s']:.2f}x" if tr else "-"
        lines.append(f"| {r['model']} | {r['devices']} | {r['samples_per_s']:.0f} | {tr['samples_per_s'] if tr else '-'} | {ratio} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
