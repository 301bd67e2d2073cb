#!/usr/bin/env bash
# Issue 13's CUDA measurements: batch-1 latency and throughput of random:llama-3-8b in bf16,
# fp8 (online, _scaled_mm) and GPTQ int4 (a random-weight checkpoint written by
# bench/quantized_checkpoint.py), the fp8 KV cache, and the quantization plugins' GPU tests.
# Run from the repository root on a CUDA machine after `. .whl/setup.sh` (or an install):
#   bash bench/run_quant_gpu.sh bandwidth latency        (first call)
#   bash bench/run_quant_gpu.sh throughput kv tests      (second call)
#   bash bench/run_quant_gpu.sh structured               (issue 15: structured-output overhead)
# JSON goes to $OUT (default ./bench-out).
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
TESSELLM="python3 -m tessellm.cli.app"
MODEL=random:llama-3-8b
GPTQ=/tmp/llama-3-8b-gptq
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}

STEP_TAIL_LINES=14
# shellcheck source=bench/step.sh
. "$(dirname "$0")/step.sh"

gptq_checkpoint() {
    [ -f "$GPTQ/config.json" ] || step write_gptq 120 python3 bench/quantized_checkpoint.py \
        --model "$MODEL" --method gptq --group-size 128 --out "$GPTQ"
}

latency() {  # latency NAME MODEL EXTRA...
    local name=$1 model=$2
    shift 2
    step "$name" 150 $TESSELLM bench latency --model "$model" --input-len 512 --output-len 256 \
        --num-iters 3 --max-model-len 1024 --output-json "$OUT/$name.json" "$@"
}

throughput() {  # throughput NAME MODEL EXTRA...
    local name=$1 model=$2
    shift 2
    step "$name" 200 $TESSELLM bench throughput --model "$model" --num-prompts 512 \
        --input-len 100:1024 --output-len 100:1024 --max-model-len 2048 \
        --output-json "$OUT/$name.json" "$@"
}

for phase in "$@"; do
    case "$phase" in
    bandwidth)
        step bandwidth 60 python3 -c "
import torch, time
x = torch.empty(4 << 30, dtype=torch.uint8, device='cuda'); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): y.copy_(x)
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f'copy bandwidth {2 * x.numel() / dt / 1e12:.4f} TB/s', torch.cuda.get_device_name())"
        ;;
    latency)
        gptq_checkpoint
        latency lat_bf16 "$MODEL" --baseline hf
        latency lat_fp8 "$MODEL" --quantization fp8
        latency lat_gptq "$GPTQ"
        ;;
    throughput)
        gptq_checkpoint
        throughput tp_bf16 "$MODEL"
        throughput tp_fp8 "$MODEL" --quantization fp8
        throughput tp_gptq "$GPTQ"
        ;;
    kv)
        throughput tp_bf16_kvfp8 "$MODEL" --kv-cache-dtype fp8
        ;;
    structured)
        step structured 150 python3 bench/structured_outputs.py --model random:qwen3-0.6b \
            --batch 1 64 --output-len 128 --repeats 2 --backend xgrammar --json "$OUT/so.json"
        ;;
    structured_8b)  # the same at batch 64 on a model whose step is not host-bound
        step structured_8b 240 python3 bench/structured_outputs.py --model random:llama-3-8b \
            --batch 64 --output-len 128 --repeats 2 --backend xgrammar --json "$OUT/so_8b.json"
        ;;
    tests)
        step tests "${TESTS_LIMIT:-280}" python3 -m pytest -q -p no:cacheprovider plugins/quant_fp8/tests \
            plugins/quant_int4/tests plugins/quant_int8/tests plugins/quant_compressed_tensors/tests \
            plugins/gguf/tests tests/test_kv_cache_fp8_gpu.py tests/test_kv_cache_fp8.py -rs
        ;;
    *) echo "unknown phase $phase" ;;
    esac
done
