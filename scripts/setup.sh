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
# requirements/lock.txt pins the exact versions of the CI machines: Python 3.11 with the CPU
# build of PyTorch that lies on their disk. Elsewhere pip takes a CUDA build, whose own pins
# (Triton, NVIDIA libraries) the lock does not hold, and numpy 2.4 / scipy 1.17 need 3.11+; so
# on other Pythons, or where the lock does not fit the PyTorch build pip finds, pyproject.toml's
# ranges decide. On 3.10 aeon comes as 1.3.0, its last release for 3.10 (the same .ts files).
LOCK=()
AEON=aeon==1.6.0
PYVER=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
case "$PYVER" in
  3.11) LOCK=(-c requirements/lock.txt) ;;
  3.10) AEON=aeon==1.3.0 ;;
esac
if [ ${#LOCK[@]} -eq 0 ]; then
  echo "setup: Python $PYVER: versions from pyproject.toml's ranges (the lock is for 3.11)"
fi
echo "setup: installing packages into .venv (PyTorch 2.13.0; the CPU build where one is on disk)"
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
if ! "${PIP[@]}" "${LOCK[@]}" torch==2.13.0; then
  [ ${#LOCK[@]} -gt 0 ] || exit 1
  echo "setup: the lock does not fit this PyTorch build; versions from pyproject.toml's ranges"
  LOCK=()
  "${PIP[@]}" torch==2.13.0
fi
"${PIP[@]}" "${LOCK[@]}" -e ".[test]"
# Real UCR/UEA time-series data sets for the signal demo (JapaneseVowels, GunPoint, ...) ship
# inside the aeon wheel; data2vec reads its .ts files by path and never imports aeon, so its
# dependencies (numba, pandas, scikit-learn pins) are not installed.
"${PIP[@]}" --no-deps "$AEON"
