#!/usr/bin/env bash
# The CUDA measurements behind bench/RESULTS.md, in phases that each fit one lease call.
# Run from the repository root on a CUDA machine with the packages installed:
#   bash bench/run_cuda_suite.sh setup tests kernels decode decode_unfused
#   bash bench/run_cuda_suite.sh g2 g1 qwen qwen_share
#   bash bench/run_cuda_suite.sh setup tp_tests tp1 tp2     (two GPUs)
# setup installs this checkout (offline, editable); the others are measurements.
# Logs and JSON go to $OUT (default ./bench-out). Each step runs even if one before fails.
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
TESSELLM="python3 -m tessellm.cli.app"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=/tmp/tessellm-cache

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T))"
    local t0=$SECONDS
    # One log for all steps: the lease returns at most 8 files.
    echo "=== $name: $*" >>"$OUT/steps.log"
    timeout "$limit" "$@" >/tmp/step.log 2>&1
    local rc=$?
    cat /tmp/step.log >>"$OUT/steps.log"
    echo "=== $name rc=$rc in $((SECONDS - t0)) s"
    grep -v -e "incorrect regex" -e "it/s]" /tmp/step.log | tail -n 25
}

run_one() {
    case "$1" in
    setup)
        if ls .whl/*.whl >/dev/null 2>&1; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site .whl/*.whl
        fi
        python3 -m pip install -q --no-index --no-deps --no-build-isolation \
            -e core -e platform_cpu -e platform_cuda -e plugins/llama -e plugins/qwen \
            -e plugins/attention_triton -e plugins/attention_torch -e kernels/triton
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        ;;
    tests)
        step tests 300 python3 -m pytest -q -x tests/test_cuda.py tests/test_kernels_triton.py
        ;;
    kernels) step kernels 240 python3 bench/cuda_kernels.py --json "$OUT/kernels.json" ;;
    gemv) step gemv 120 python3 bench/cuda_kernels.py --gemv-only --json "$OUT/gemv.json" ;;
    decode) step decode 200 python3 bench/cuda_steps.py decode --json "$OUT/decode.json" ;;
    decode_split64)
        step decode_split64 200 python3 bench/cuda_steps.py decode --min-split-tokens 64 \
            --json "$OUT/decode_split64.json"
        ;;
    decode_unfused)
        TESSELLM_FUSED_OPS=none step decode_unfused 200 \
            python3 bench/cuda_steps.py decode --json "$OUT/decode_unfused.json"
        ;;
    g2)
        step g2 300 $TESSELLM bench latency --model random:llama-3-8b --input-len 512 \
            --output-len 256 --num-iters 3 --baseline hf --max-model-len 1024 \
            --output-json "$OUT/g2.json"
        ;;
    g1)
        step g1 540 $TESSELLM bench throughput --model random:llama-3-8b --num-prompts 512 \
            --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 --baseline hf \
            --hf-batch-size 64 --baseline-num-prompts 64 --output-json "$OUT/g1.json"
        ;;
    qwen)
        step qwen 300 $TESSELLM bench throughput --model random:qwen3-0.6b --num-prompts 256 \
            --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 \
            --output-json "$OUT/qwen.json"
        ;;
    qwen_share)
        step qwen_share 300 python3 bench/cuda_steps.py cpu-share --model random:qwen3-0.6b \
            --num-prompts 256 --batch 256 --json "$OUT/qwen_share.json"
        ;;
    tp_tests)
        step tp_tests 300 python3 -m pytest -q -x -m gpu tests/test_tensor_parallel.py
        ;;
    tp1 | tp2)
        # Issue 7: random:llama-3-8b bf16 throughput at TP=1 and TP=2 (NCCL) on one host.
        step "$1" 240 $TESSELLM bench throughput --model random:llama-3-8b --num-prompts 256 \
            --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 \
            --tensor-parallel-size "${1#tp}" --output-json "$OUT/$1.json"
        ;;
    *)
        echo "unknown step $1 (setup tests kernels decode decode_unfused g2 g1 qwen qwen_share"
        echo "  tp_tests tp1 tp2)"
        return 2
        ;;
    esac
}

for name in "$@"; do
    run_one "$name"
done
