#!/usr/bin/env bash
# bench/gpu.sh: every GPU figure of the D3 inference path, in one run of under 8 minutes.
#
#   1. the model alone: images/s per batch size in fp16 and in bf16, GPU memory at batch 64,
#      and the fp16 and bf16 fake probabilities against fp32 (bench/model_throughput.py)
#   2. the same model through the Triton tier (`d3 serve-inference`), its best batch, and the API
#      at 64 clients through that tier, several Gunicorn workers sharing it (bench/api_load.py)
#
#   bench/gpu.sh              on the GPU: the real ViT-L/14 architecture (seeded random weights)
#   bench/gpu.sh --cpu        the same steps on the tiny model on the CPU, in a few minutes: a
#                             smoke test of this script (tests/test_inference_tier.py runs it)
#
# Environment: PYTHON (default .venv/bin/python beside this repository), API_WORKERS (default 8 on
# the GPU: the API's decode and resize need CPU cores to keep one GPU busy), STEP_TIMEOUT (seconds
# per step, default 240). Prints markdown; nothing here asserts a target.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CPU=0
case "${1:-}" in
    --cpu) CPU=1 ;;
    "") ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown option $1 (--cpu, --help)" >&2; exit 2 ;;
esac
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
cd "$ROOT"

step() { printf '\n## %s\n\n' "$1"; }
run() { timeout --foreground "$STEP_TIMEOUT" "$PYTHON" "$@"; }

if [ "$CPU" -eq 1 ]; then
    MODEL=(--tiny --device cpu)
    THROUGHPUT=(--max-batch 2 --iters 1 --min-seconds 0 --engine-seconds 0 --callers 1 --compare-images 2)
    TIER=(--tier-batch-sizes 1 2 --tier-seconds 0.5 --tier-max-batch 8 --requests 4 --concurrency 2
          --rounds 1 --workers "${API_WORKERS:-1}" --threads 2)
    PRECISIONS=(fp32 bf16)
    COMPARE=bf16
else
    "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        { echo "gpu.sh: no CUDA device here (use --cpu for the smoke run)" >&2; exit 1; }
    MODEL=(--device cuda)
    THROUGHPUT=(--max-batch 256 --iters 5 --min-seconds 1 --engine-seconds 5 --callers 64 --engine-batch 64
                --compare-images 64)
    TIER=(--tier-batch-sizes 16 32 64 128 --tier-seconds 3 --tier-max-batch 128 --tier-clients 3
          --requests 3000 --concurrency 64 --rounds 3 --workers "${API_WORKERS:-8}" --threads 16)
    PRECISIONS=(fp16 bf16)
    COMPARE=fp16,bf16
fi

if [ "$CPU" -eq 1 ]; then
    printf '# D3 GPU figures: CPU smoke run, tiny model (no figure here means anything)\n'
else
    printf '# D3 GPU figures: %s\n' "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1)"
fi
started=$SECONDS

compare="$COMPARE"  # against fp32 once, in the first run (the fp32 reference is built there)
for precision in "${PRECISIONS[@]}"; do
    step "model alone, $precision"
    run bench/model_throughput.py "${MODEL[@]}" --precision "$precision" "${THROUGHPUT[@]}" --compare "$compare"
    compare=""
done

step "through the Triton tier, and the API at $(printf '%s' "${TIER[*]}" | sed -nE 's/.*--concurrency ([0-9]+).*/\1/p') clients through it (${PRECISIONS[0]})"
run bench/api_load.py --inference-tier --no-in-process "${MODEL[@]}" --precision "${PRECISIONS[0]}" "${TIER[@]}"

printf '\ngpu.sh: done in %d s\n' "$((SECONDS - started))"
