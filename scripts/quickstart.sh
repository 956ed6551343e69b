#!/usr/bin/env bash
# The quickstart: installs Debian's Fashion-MNIST package if it is missing, builds the CLI and
# trains AST with three sub-nets (50 / 20 / 10 % dense) into a new run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST is not installed: installing Debian's dataset-fashion-mnist package" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
# A new run directory unless the caller names one (`--out DIR` or `--out=DIR`).
out=(--out "runs/quickstart-$(date +%Y%m%d-%H%M%S)")
for arg in "$@"; do
  case "$arg" in --out|--out=*) out=() ;; esac
done
exec cargo run --release -p ast-cli -- run --recipe quickstart "${out[@]}" "$@"
