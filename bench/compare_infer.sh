#!/usr/bin/env bash
# Side-by-side CPU inference latency: `ast-cli bench-infer` (our runtime: sparse sub-nets at
# densities 0.1 / 0.05 / 0.02 with ERK masks, a 1:8 N:M one, and the same model dense) and the PyTorch
# baseline `torch_infer.py` (the same architecture dense in torch.inference_mode()), same
# sitting, 2 threads each, batch 1 and 64. Not part of CI. Needs a release build and a venv with
# torch from PyPI:
#   cargo build --release -p ast-cli
#   python3 -m venv .venv && .venv/bin/pip install torch
#   bench/compare_infer.sh [runs]     # prints one markdown table
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-50}
py=${PYTHON:-.venv/bin/python}
cli=target/release/ast-cli
export OMP_NUM_THREADS=2 RAYON_NUM_THREADS=2
out=$(mktemp -d)
for model in resnet32 wide-resnet32; do
  "$cli" bench-infer --synthetic "$model" --densities 0.1,0.05,0.02 --nm 1:8 --batch 1,64 --runs "$runs" \
    --json "$out/$model.json" > /dev/null
  for batch in 1 64; do
    "$py" bench/torch_infer.py --model "$model" --batch "$batch" --iters "$runs" 2>/dev/null \
      > "$out/$model-torch-$batch.txt"
  done
done
python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
print("| model | sub-net | batch 1 ms | vs our dense | vs PyTorch | batch 64 ms | vs our dense | vs PyTorch |")
print("|---|---|---|---|---|---|---|---|")
for model in ["resnet32", "wide-resnet32"]:
    ours = json.load(open(f"{out}/{model}.json"))
    torch = {}
    for b in (1, 64):
        line = open(f"{out}/{model}-torch-{b}.txt").read()
        torch[b] = float(re.search(r"median_ms=([0-9.]+)", line).group(1))
    rows = {}
    for r in ours["timings"]:
        rows[(r["subnet"], r["batch"])] = r
    print(f"| {model} | PyTorch dense | {torch[1]:.3f} | | 1.00× | {torch[64]:.2f} | | 1.00× |")
    keys = ["dense"] + [k for k in range(4)]
    for k in keys:
        cells = []
        for b in (1, 64):
            ms = rows[(k, b)]["median_ms"]
            dense = rows[("dense", b)]["median_ms"]
            cells += [f"{ms:.3f}" if b == 1 else f"{ms:.2f}", f"{dense / ms:.2f}×", f"{torch[b] / ms:.2f}×"]
        name = "ours dense" if k == "dense" else ("1:8" if k == 3 else f"{rows[(k, 1)]['density']:.4f}")
        print(f"| {model} | {name} | " + " | ".join(cells) + " |")
print(f"\n{ours['cpu']}, {ours['simd']}, {ours['threads']} threads; medians of {sys.argv[1] and ''}the timed passes")
PY
rm -rf "$out"
