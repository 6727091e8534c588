#!/usr/bin/env bash
# Set up everything the demo and the tests need, idempotently:
#   - Debian packages (demo data, speech synthesizers, test speech), when apt-get is available;
#   - a virtual environment in .venv with the pinned CPU build of PyTorch and this package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# Debian packages: the image demo's data (Fashion-MNIST), the speech synthesizers that build
# the spoken-word corpus, real read speech (pocketsphinx test data) for the tests, and WordNet
# 3.0 (glosses for the text demo).
DEBS="dataset-fashion-mnist espeak-ng flite sox pocketsphinx-testdata wordnet-base"
missing=""
for pkg in $DEBS; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
    echo "setup: installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q $missing >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
  else
    echo "setup: apt-get not found; please install:$missing" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing pinned packages into .venv (CPU PyTorch 2.13.0)"
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock.txt torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/lock.txt -e ".[test]"
# Real UCR/UEA time-series data sets for the signal demo (JapaneseVowels, GunPoint, ...) ship
# inside the aeon wheel; data2vec reads its .ts files by path and never imports aeon, so its
# dependencies (numba, pandas, scikit-learn pins) are not installed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps aeon==1.6.0
