#!/usr/bin/env bash
# Side-by-side CPU throughput of the AST training step: `ast-cli bench` (Flex, our kernels)
# and the PyTorch baseline `torch_ast_step.py`, same sitting, 2 threads each, batch 128, K = 3.
# Not part of CI. Needs a release build and a venv with torch from PyPI:
#   cargo build --release -p ast-cli
#   python3 -m venv .venv && .venv/bin/pip install torch
#   bench/compare_cpu.sh [steps]            # prints one markdown row per model and density
#   AST_SIMD=avx2 bench/compare_cpu.sh      # both sides limited to AVX2 on an AVX-512 CPU
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}
py=${PYTHON:-.venv/bin/python}
cli=target/release/ast-cli
export OMP_NUM_THREADS=2 RAYON_NUM_THREADS=2
if [ "${AST_SIMD:-}" = avx2 ]; then
  # PyTorch's own kernels and oneDNN's, limited alike.
  export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
fi
echo "| model | density | ast-cli (Flex) img/s | dense-gradient step s | PyTorch img/s | ratio | ast-cli peak RSS MiB | PyTorch peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|"
for model in resnet32 wide-resnet32; do
  for density in 1.0 0.1 0.05 0.02; do
    ours=$( { /usr/bin/time -f "RSS %M" "$cli" bench --model "$model" --batch 128 --steps "$steps" \
      --density "$density"; } 2>&1 )
    theirs=$( { /usr/bin/time -f "RSS %M" "$py" bench/torch_ast_step.py --model "$model" --batch 128 \
      --steps "$steps" --density "$density"; } 2>&1 )
    ips=$(grep -o 'images_per_s=[0-9.]*' <<<"$ours" | cut -d= -f2)
    dense=$(grep -o 'dense-gradient step [0-9.]*' <<<"$ours" | awk '{print $3}')
    tips=$(grep -o 'img_per_s=[0-9.]*' <<<"$theirs" | cut -d= -f2)
    rss=$(grep -o 'RSS [0-9]*' <<<"$ours" | awk '{printf "%.0f", $2/1024}')
    trss=$(grep -o 'RSS [0-9]*' <<<"$theirs" | awk '{printf "%.0f", $2/1024}')
    ratio=$(awk -v a="$ips" -v b="$tips" 'BEGIN{printf "%.2f", a/b}')
    echo "| $model | $density | $ips | $dense | $tips | ${ratio}× | $rss | $trss |"
    simd=$(grep -o 'simd=[^ ]*' <<<"$ours" | cut -d= -f2)
  done
done
echo
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); our kernels at $simd; 2 threads"
