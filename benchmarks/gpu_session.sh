#!/usr/bin/env bash
# The next GPU session's prepared measurements, in one call of at most 10 minutes
# (benchmarks/README.md, "GPU, sixth pass" to "GPU, ninth pass"), run from the repository
# root on a CUDA machine whose PyTorch ships Triton:
#   1. image-v2-base's throughput and MFU (data2vec bench) at batch 128 and 256 (the issue
#      fixes no batch; 256 should fit in 80 GB after the ninth pass: 33 GB at 128 before it);
#      then the sixth pass against the code without it, the decoder convolution's opt-in forms
#      (transposed products; a pipelined loop, the seventh pass; its activation copies through
#      L1, the eighth), the eighth pass's attention projection and register caps (opt-in),
#      and its decoder rows in two tiles and shorter norm programs undone, the ninth pass's
#      loss read by index undone, and the teachers' norms fused (their 25216 tokens are
#      under token_norm.MIN_ROWS; the fifth pass could not tell it from noise), in the whole
#      step, all alternating, and the idle-gap profile ("conv swapped" is in the sweep);
#   2. CPU-vs-GPU and bf16 agreement (the eighth pass changed default kernels: the decoder's
#      weight gradient and row kernels), the decoder convolution's tile sweep (the opt-in
#      forms included), the MLP kernel's launch sweep, and the loss kernel alone (its
#      gradient's bits against the gather's, its launch sweep).
# Results go to $OUT (default benchmarks/results), one JSON and one log per run; each run has
# its own time limit, so the second one runs even if the first is cut short.
#
# `gpu_session.sh gemm` runs only an experiment (gpu_gemm.py: fc1 with GELU in a Triton
# product's epilogue against cuBLAS then F.gelu), for a second short call on the warm machine.
#
# Machines without this package's dependencies installed: put wheels for them in .whl/ first
# (soundfile, soxr, cffi, pycparser for the machine's Python), e.g.
#   python -m pip download soundfile soxr cffi pycparser --only-binary=:all: \
#       --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python3}  # the machine's Python with its CUDA build of PyTorch
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
stamp=$(date +%F)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

run() {  # run NAME LIMIT_S ARGS...: gpu_check.py into $OUT/gpu_check_<date>_<NAME>.{json,log}
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$PYTHON" benchmarks/gpu_check.py "$@" \
    > "$OUT/gpu_check_${stamp}_${name}.json" 2> "$OUT/gpu_check_${stamp}_${name}.log"
  echo "$name: rc $? ($(wc -c < "$OUT/gpu_check_${stamp}_${name}.json") bytes of JSON)"
  tail -n 5 "$OUT/gpu_check_${stamp}_${name}.log"
}

if [[ "${1:-}" == "gemm" ]]; then  # a short second call, where device time is left (~1 min)
  run gemm 120 --batch --no-agreement --gemm
  exit 0
fi

run step_variants 300 --batch 128 256 --conv-impl auto --no-agreement \
  --variants default "before sixth pass" "host reads" "attention projection inside" \
  "conv pipelined" "conv pipelined l1" "conv pipelined swapped" "conv 128 registers" \
  "blocks 128 registers" "decoder rows padded" "norm rows 128" "loss gathered" \
  "norms from 16384 rows" --repeat 2 --profile
run agreement_sweeps 250 --batch --conv --sweep --mlp --loss
