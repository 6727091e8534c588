#!/usr/bin/env bash
# The next GPU session's prepared measurements, in one call of at most 10 minutes
# (benchmarks/README.md, "GPU, tenth pass"), run from the repository root on a CUDA machine
# whose PyTorch ships Triton:
#   1. CPU-vs-GPU and bf16 agreement first: the tenth pass fixed the decoder convolution's
#      bias gradient (its product under a run-time condition, which Triton's pipeliner raced),
#      found wrong by this check on an H200 and not yet run since; the MLP, attention and
#      loss kernels each against torch (with their launch sweeps); and the check every
#      pretraining run now makes before its first step (data2vec/engine/kernel_check.py), on
#      image-v2-base (bf16, fp32) and audio-v2-base (bf16): it must pass the kernels as
#      they are, with room to spare (its "allowance" against "triton_error");
#   2. image-v2-base's throughput and MFU (data2vec bench) at batch 128 and 256 (measured on
#      an H200 only, with the racing kernel), then the whole step three times over: the
#      default, the bias as a separate sum (the fifth pass's form), and the opt-ins that tied
#      on the H200 (the pipelined forward, the teachers' norms fused, the register caps) or
#      won there as kernels alone (the forward with BLOCK_K 32 and 4 stages, the MLP kernel's
#      64-row programs);
#   3. the decoder convolution's kernels alone: the forward's best settings of the H200 sweep
#      and the weight gradient's sweep with its bias sums (never reached on the H200).
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

run agreement 150 --batch --mlp --attention --loss
run step_variants 230 --batch 128 256 --conv-impl auto --no-agreement \
  --variants default "conv bias pass" "conv pipelined" "conv pipelined k32" "mlp rows 64" \
  "norms from 16384 rows" "blocks 128 registers" --repeat 3
run sweeps 170 --batch --no-agreement --conv --sweep
