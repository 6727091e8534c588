#!/usr/bin/env bash
# The test suite on the oldest Python and PyTorch that pyproject.toml allows (Python 3.10,
# PyTorch 2.4.1), in .venv-oldest. Not part of CI: PyPI's PyTorch 2.4.1 is a CUDA build, about
# 5.5 GB with its NVIDIA libraries; the tests run on the CPU. Extra arguments go to pytest.
#   PYTHON310=/path/to/python3.10 bash scripts/test_oldest.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON310=${PYTHON310:-python3.10}
if [ ! -x .venv-oldest/bin/python ]; then
  echo "test_oldest: creating .venv-oldest with $PYTHON310"
  "$PYTHON310" -m venv .venv-oldest
fi
PIP=(.venv-oldest/bin/python -m pip install -q --disable-pip-version-check)
echo "test_oldest: installing PyTorch 2.4.1 and the package"
"${PIP[@]}" torch==2.4.1
# The test extra is left out: it asks for Triton >= 3.2, and torch 2.4.1 pins its own 3.0.0
# (with which the Triton kernels stay off; the tests check that they say so). transformers 5
# needs PyTorch 2.6, so the Hugging Face tests take 4.x.
"${PIP[@]}" -e . pytest scikit-learn "transformers>=4.40,<5"
# aeon 1.3.0 is the last release for Python 3.10 (data files only; see scripts/setup.sh).
"${PIP[@]}" --no-deps aeon==1.3.0
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv-oldest/bin/python -m pytest -q "$@"
