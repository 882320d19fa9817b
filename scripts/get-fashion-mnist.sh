#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian package dataset-fashion-mnist: the four IDX .gz files) if it is missing.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or put the four" >&2
  echo "original IDX .gz files in a folder and pass --data-path FOLDER to switch-dit." >&2
  exit 1
fi
