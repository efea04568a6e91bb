#!/usr/bin/env bash
# How close to the card we run, with vLLM beside us in the same call (issue #17), in two parts that each fit
# one device call of 10 minutes; vLLM carried and unpacked first (../shared/peers/vllm/README.md):
#
#   bash bench/gpu_hardware_limit.sh 1 OUTDIR   # the GPU tests; Llama-1B shape at 2048 requests, ours and vLLM;
#                                               # where the step time goes, overlapped loop on and off
#   bash bench/gpu_hardware_limit.sh 2 OUTDIR   # Llama-3.1-8B shape at 2048 requests and SmolLM2-135M shape,
#                                               # ours and vLLM
#   bash bench/gpu_hardware_limit.sh 3 OUTDIR MODEL_DIR   # one short call, no vLLM: the GPU tests, structured
#                                               # output's step time (MODEL_DIR: SmolLM2's config and tokenizer),
#                                               # where the step time goes
#
# Engine defaults on both sides; random weights, prompts U(64, 512), 256 output tokens, greedy, EOS ignored.
set -uo pipefail
PART=$1
OUTDIR=${2:-${OUT:-bench/results}}
cd "$(dirname "$0")/.."
export PYTHONPATH=".:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
gpu_tests() {
    # Our tests with our own grammar library's version where one was carried to /tmp/ours (vLLM pins another).
    PYTHONPATH=".:/tmp/ours:$PYTHONPATH" timeout "${TEST_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_fused.py \
        tests/test_gpu_tensor_parallel.py 2>&1 | tail -n 30 | tee "$OUTDIR/gpu_tests.txt"
}
profile() {
    python3 -m bench.gpu_profile --shape llama-1b --num-requests 1024 --window 100 --compare-overlap \
        --out "$OUTDIR/profile_llama1b.json"
}
case $PART in
1)
    gpu_tests
    python3 -m bench.offline_gpu --skip-hf --shapes llama-1b --num-requests 2048 --out "$OUTDIR/offline_llama1b.json"
    profile ;;
2)
    python3 -m bench.offline_gpu --skip-hf --shapes llama-8b,smollm2-135m --num-requests 2048 \
        --out "$OUTDIR/offline_8b_135m.json" ;;
3)
    gpu_tests
    PYTHONPATH=".:/tmp/ours:$PYTHONPATH" python3 -m bench.structured --model "$3" --load-format dummy --device cuda \
        --dtype bfloat16 --num-requests 64 --output-len 64 --out "$OUTDIR/structured_cuda.json"
    profile ;;
*) echo "part must be 1, 2 or 3, got $PART" >&2; exit 2 ;;
esac
