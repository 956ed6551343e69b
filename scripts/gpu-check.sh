#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (no cargo needed), times the CUDA
# configurations, benches the models, checks CUDA against Flex and trains one quickstart epoch,
# and writes one report. Built for a short GPU lease: a global time budget bounds every step,
# and results are written as they come, so a cut-off run still reports what it measured.
#
# Usage: scripts/gpu-check.sh [BIN_DIR] [REPORT_DIR]
#   BIN_DIR     release binaries built on a CPU machine (scripts/gpu-build.sh):
#               ast-cli-autotune (features cuda,cuda-autotune) and ast-cli-fixed (cuda),
#               each possibly gzip-compressed (.gz); default target/gpu
#   REPORT_DIR  where report.md and the logs go; default $OUT, else gpu-report
# Environment: BUDGET_S (default 560) seconds for everything; DATA a Fashion-MNIST directory
#   (default: target/gpu/fashion-mnist, else Debian's /usr/share/datasets/fashion-mnist).
set -uo pipefail
export RUST_BACKTRACE=1
cd "$(dirname "$0")/.."
bins=${1:-target/gpu}
out_dir=${2:-${OUT:-gpu-report}}
# Logs go to a scratch directory; OUT_DIR receives report.md (after every step) and logs.tgz.
report_dir=/tmp/ast-gpu/report
budget=${BUDGET_S:-560}
start=$(date +%s)
rm -rf /tmp/ast-gpu
mkdir -p "$report_dir" "$out_dir"
report="$report_dir/report.md"
: > "$report"
pack() { cp "$report" "$out_dir/report.md"; tar -czf "$out_dir/logs.tgz" -C "$report_dir" . 2> /dev/null; }
trap 'say "stopped by a signal"; pack; exit 1' TERM INT
say() { echo "$*" | tee -a "$report"; }

# CUDA libraries: NVRTC from the toolkit's targets/x86_64-linux/lib and the driver's libcuda
# (never the toolkit's lib/stubs: its stub libcuda makes device initialisation fail).
add_lib_dir() { # add_lib_dir LIBRARY DIR...: the first DIR holding LIBRARY joins the search path
  local lib=$1 d
  shift
  for d in "$@"; do
    case "$d" in *stubs*) continue ;; esac
    if ls "$d"/"$lib".so* > /dev/null 2>&1; then
      export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      return
    fi
  done
}
add_lib_dir libnvrtc /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/targets/x86_64-linux/lib \
  /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu
add_lib_dir libcuda /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64
[ -z "${CUDA_PATH:-}" ] && [ -d /usr/local/cuda ] && export CUDA_PATH=/usr/local/cuda
say "# GPU check $(date -u +%FT%TZ)"
say ""
say '```'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$report"
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
say "cpus=$(nproc)"
say '```'

declare -A cli
for variant in autotune fixed; do
  src="$bins/ast-cli-$variant"
  dst="/tmp/ast-gpu/ast-cli-$variant"
  if [ -f "$src.gz" ]; then
    gzip -dc "$src.gz" > "$dst" && chmod +x "$dst" && cli[$variant]=$dst
  elif [ -f "$src" ]; then
    cp "$src" "$dst" && chmod +x "$dst" && cli[$variant]=$dst
  fi
done
if [ ${#cli[@]} -eq 0 ]; then
  say "no ast-cli binary in $bins (build them with scripts/gpu-build.sh)"
  exit 1
fi
data=${DATA:-}
[ -z "$data" ] && [ -d target/gpu/fashion-mnist ] && data=target/gpu/fashion-mnist
[ -z "$data" ] && data=/usr/share/datasets/fashion-mnist

left() { echo $((budget - ($(date +%s) - start))); }

# step NAME LIMIT_S VARIANT ARGS...: runs `ast-cli-VARIANT ARGS` within LIMIT_S (or what is left
# of the budget), sampling the GPU's memory; appends the log's key lines to the report.
step() {
  local name=$1 limit=$2 variant=$3
  shift 3
  local bin=${cli[$variant]:-}
  local remaining
  remaining=$(left)
  if [ -z "$bin" ]; then say "- $name: skipped (no $variant binary)"; return; fi
  if [ "$remaining" -lt 15 ]; then say "- $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local log="$report_dir/$name.log"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 \
    > "$report_dir/$name.mem" 2> /dev/null &
  local smi=$!
  local t0 rc t1
  t0=$(date +%s.%N)
  timeout -k 5 "$limit" "$bin" "$@" > "$log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  kill "$smi" 2> /dev/null
  wait "$smi" 2> /dev/null
  local peak wall verdict="ok" block="$report_dir/$name.block"
  peak=$(sort -n "$report_dir/$name.mem" 2> /dev/null | tail -1)
  wall=$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (exit $rc)"
  # One append per step: steps running at once do not interleave their lines.
  {
    echo "- **$name** ($variant: $*): $verdict, wall ${wall} s, peak GPU memory ${peak:-?} MiB"
    grep -E "images_per_s|first_step_s|first iteration|consistent|against flex|sub-net [0-9]+:|top-1|error|panick|test result|SKIPPED|largest loss|peak GPU memory" "$log" \
      | head -12 | sed 's/^/    /'
    [ "$verdict" != "ok" ] && tail -3 "$log" | sed 's/^/    | /'
  } > "$block"
  cat "$block" >> "$report"
  cat "$block"
  rm -f "$block"
  cp "$report" "$out_dir/report.md"
}

bench() { # bench NAME LIMIT VARIANT CACHE MODEL BATCH [extra args]
  local name=$1 limit=$2 variant=$3 cache=$4 model=$5 batch=$6
  shift 6
  AST_KERNEL_CACHE=/tmp/ast-gpu/cache-$cache step "$name" "$limit" "$variant" bench \
    --backend cuda --model "$model" --batch "$batch" --warmup 1 --steps 10 --dense-steps 5 \
    --density 0.05 --json "$report_dir/$name.json" "$@"
}

# Cold starts compile on the CPU (NVRTC, one core per process): the configurations start
# together, each with its own empty cache, and are timed again one at a time once cached.
say ""
say "## 1. Cold start, empty kernel caches (5 processes at once: GPU shared while compiling)"
bench cold-autotune-fusion-resnet32 240 autotune autotune-fusion resnet32 128 &
bench cold-fixed-fusion-resnet32 240 fixed fixed-fusion resnet32 128 &
bench cold-fixed-nofusion-resnet32 240 fixed fixed-nofusion resnet32 128 --fusion off &
bench cold-autotune-fusion-smallcnn 240 autotune autotune-smallcnn small-cnn 128 &
AST_KERNEL_CACHE=/tmp/ast-gpu/cache-check step check-backend 240 fixed check-backend \
  --backend cuda --json "$report_dir/check-backend.json" &
wait

say ""
say "## 2. Second run of each configuration (its cache from part 1), alone on the GPU"
bench warm-autotune-fusion-resnet32 45 autotune autotune-fusion resnet32 128
bench warm-fixed-fusion-resnet32 45 fixed fixed-fusion resnet32 128
bench warm-fixed-nofusion-resnet32 45 fixed fixed-nofusion resnet32 128 --fusion off

say ""
say "## 2b. PyTorch's AST step on the same GPU (bench/torch_ast_step.py), when torch is there"
py=$(command -v python3 || command -v python || true)
if [ -n "$py" ] && timeout 60 "$py" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  for model in resnet32 wide-resnet32; do
    timeout 90 "$py" bench/torch_ast_step.py --device cuda --model $model --density 0.05 --steps 20 \
      2>&1 | tail -2 | sed 's/^/    /' | tee -a "$report"
  done
else
  say "- PyTorch with CUDA is not installed on this machine (python: ${py:-none}): our figures only"
fi

say ""
say "## 2c. The test suite's CUDA tests (tests/cuda_backend.rs)"
if [ -f "$bins/cuda-tests.gz" ]; then
  gzip -dc "$bins/cuda-tests.gz" > /tmp/ast-gpu/cuda-tests && chmod +x /tmp/ast-gpu/cuda-tests
  cli[tests]=/tmp/ast-gpu/cuda-tests
  AST_REQUIRE_GPU=1 AST_KERNEL_CACHE=/tmp/ast-gpu/cache-tests step cuda-tests 120 tests --test-threads 1 --nocapture
else
  say "- cuda-tests: skipped (no $bins/cuda-tests.gz: build it with scripts/gpu-build.sh)"
fi

say ""
say "## 3. Models and precision (fixed kernels, fusion): compiled together, then timed alone"
models=("wide-resnet32 128" "resnet18 128" "resnet50-imagenet 64")
for m in "${models[@]}"; do
  set -- $m
  bench "cold-fixed-$1" 150 fixed "fixed-$1" "$1" "$2" &
done
for p in bf16 f16; do
  bench "cold-fixed-$p-resnet32" 150 fixed "fixed-$p" resnet32 128 --precision $p &
done
if [ -f "$data/train-images-idx3-ubyte.gz" ] || [ -f "$data/train-images-idx3-ubyte" ]; then
  AST_KERNEL_CACHE=/tmp/ast-gpu/cache-quickstart step quickstart-cuda 150 fixed run \
    --backend cuda --recipe quickstart --epochs 1 --data-path "$data" \
    --out /tmp/ast-gpu/quickstart-cuda --overwrite &
else
  say "- quickstart: skipped (no Fashion-MNIST in $data)"
fi
wait
cp /tmp/ast-gpu/quickstart-cuda/summary.json "$report_dir/quickstart-cuda-summary.json" 2> /dev/null
cp /tmp/ast-gpu/quickstart-cuda/metrics.jsonl /tmp/ast-gpu/quickstart-cuda/events.jsonl \
  "$report_dir/" 2> /dev/null
ckpt=$(ls -d /tmp/ast-gpu/quickstart-cuda/checkpoints/epoch-* 2> /dev/null | tail -1)
[ -n "$ckpt" ] && cp "$ckpt"/*.safetensors "$report_dir/" 2> /dev/null
for m in "${models[@]}"; do
  set -- $m
  bench "warm-fixed-$1" 40 fixed "fixed-$1" "$1" "$2"
done
for p in bf16 f16; do
  bench "warm-fixed-$p-resnet32" 40 fixed "fixed-$p" resnet32 128 --precision $p
done
bench warm-autotune-wide-resnet32 60 autotune autotune-fusion wide-resnet32 128

say ""
say "## 4. Data-parallel machinery with one worker (--devices 0): its cost against part 3's epoch"
if [ -d /tmp/ast-gpu/quickstart-cuda ]; then
  AST_KERNEL_CACHE=/tmp/ast-gpu/cache-quickstart step quickstart-devices0 120 fixed run \
    --backend cuda --recipe quickstart --epochs 1 --data-path "$data" \
    --out /tmp/ast-gpu/quickstart-devices0 --overwrite --devices 0
  cp /tmp/ast-gpu/quickstart-devices0/metrics.jsonl "$report_dir/metrics-devices0.jsonl" 2> /dev/null
fi

say ""
say "total wall $(( $(date +%s) - start )) s of a ${budget} s budget"
pack
