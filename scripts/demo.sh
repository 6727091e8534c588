#!/usr/bin/env bash
# One command: set up, then run the demo (data2vec 2.0 on Fashion-MNIST, probes, plots).
# Extra arguments go to `data2vec demo`, e.g. `bash scripts/demo.sh --minutes 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/data2vec demo "$@"
