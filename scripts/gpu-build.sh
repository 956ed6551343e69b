#!/usr/bin/env bash
# Builds, on a CPU machine, everything scripts/gpu-check.sh runs on a GPU machine (which has no
# cargo and no internet) into target/gpu: the CLI with fixed conv kernels (`cuda`) and with
# autotuned ones (`cuda-autotune`), the CUDA test binary, all stripped and gzip-compressed, and
# the quickstart's slice of Fashion-MNIST (its first 22 000 / 4 000 images). About 12 minutes on
# 2 cores when burn is already built; ~40 MB to carry.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/gpu
mkdir -p "$out"
pack() { # pack SRC NAME
  cp "$1" "$out/$2"
  strip "$out/$2"
  gzip -9 -f "$out/$2"
}
cargo build --release -p ast-cli --features cuda
pack target/release/ast-cli ast-cli-fixed
test_bin=$(cargo test --release -p ast-tests --features cuda --test cuda_backend --no-run 2>&1 \
  | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[ -n "$test_bin" ] || { echo "could not find the cuda_backend test binary" >&2; exit 1; }
pack "$test_bin" cuda-tests
cargo build --release -p ast-cli --features cuda,cuda-autotune
pack target/release/ast-cli ast-cli-autotune

data=/usr/share/datasets/fashion-mnist
if [ -f "$data/train-images-idx3-ubyte.gz" ]; then
  mkdir -p "$out/fashion-mnist"
  python3 - "$data" "$out/fashion-mnist" <<'PY'
import gzip, struct, sys
src, dst = sys.argv[1], sys.argv[2]
for prefix, n in [("train", 22000), ("t10k", 4000)]:
    with gzip.open(f"{src}/{prefix}-images-idx3-ubyte.gz") as f:
        magic, _, rows, cols = struct.unpack(">IIII", f.read(16))
        pixels = f.read(n * rows * cols)
    with gzip.open(f"{dst}/{prefix}-images-idx3-ubyte.gz", "wb", 9) as g:
        g.write(struct.pack(">IIII", magic, n, rows, cols) + pixels)
    with gzip.open(f"{src}/{prefix}-labels-idx1-ubyte.gz") as f:
        magic, _ = struct.unpack(">II", f.read(8))
        labels = f.read(n)
    with gzip.open(f"{dst}/{prefix}-labels-idx1-ubyte.gz", "wb", 9) as g:
        g.write(struct.pack(">II", magic, n) + labels)
PY
fi
du -sh "$out"
echo "carry $out to the GPU machine and run: scripts/gpu-check.sh $out \"\$OUT\""
