#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
#   - Debian's dataset-fashion-mnist (the demo's default data), when apt-get is available;
#   - a virtual environment in .venv with the pinned CPU build of PyTorch and this package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

if [ ! -f "$FMNIST" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    echo "setup: installing Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: apt-get not found; install Fashion-MNIST into /usr/share/datasets/fashion-mnist" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing pinned packages into .venv (CPU PyTorch 2.13.0)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock.txt torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock.txt -e ".[test]"
