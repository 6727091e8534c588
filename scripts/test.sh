#!/usr/bin/env bash
# One command: set up, then lint and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
.venv/bin/ruff check data2vec tests benchmarks
.venv/bin/ruff format --check data2vec tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
