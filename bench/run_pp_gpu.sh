#!/usr/bin/env bash
# Issue 20: pipeline parallelism against tensor parallelism on 2 GPUs of one host, same
# call: random:llama-3-8b in bf16, PP=2 (two stages of 16 layers, two steps in flight) and
# TP=2, throughput then batch-1 latency, the two modes interleaved so that both see the
# same machine state. Run from the repository root on a machine with 2 CUDA devices after
# `. .whl/setup.sh`:   bash bench/run_pp_gpu.sh          (JSON and logs go to $OUT)
# With 4 GPUs, `MODES="tp2 pp2 tp2pp2 tp4"` adds the combined and the 4-way runs.
set -u
OUT=${OUT:-./bench-out}
MODES=${MODES:-"tp2 pp2"}
MODEL=${MODEL:-random:llama-3-8b}
mkdir -p "$OUT"
TESSELLM="python3 -m tessellm.cli.app"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}

# shellcheck source=bench/step.sh
. "$(dirname "$0")/step.sh"

sizes() {  # sizes MODE -> "--tensor-parallel-size T -e pipeline_parallel_size=P"
    local tp=1 pp=1
    case $1 in
        tp2) tp=2 ;; tp4) tp=4 ;; pp2) pp=2 ;; pp4) pp=4 ;; tp2pp2) tp=2 pp=2 ;;
        *) echo "unknown mode $1" >&2; exit 1 ;;
    esac
    echo "--tensor-parallel-size $tp -e pipeline_parallel_size=$pp"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for mode in $MODES; do
    # shellcheck disable=SC2046
    step "pp_${mode}_throughput" 280 $TESSELLM bench throughput --model "$MODEL" \
        --dtype bfloat16 $(sizes "$mode") --num-prompts 256 --input-len 512 --output-len 256 \
        --max-model-len 2048 --output-json "$OUT/pp_${mode}_throughput.json"
done
for mode in $MODES; do
    # shellcheck disable=SC2046
    step "pp_${mode}_latency" 200 $TESSELLM bench latency --model "$MODEL" \
        --dtype bfloat16 $(sizes "$mode") --input-len 512 --output-len 128 --num-iters 3 \
        --max-model-len 2048 --output-json "$OUT/pp_${mode}_latency.json"
done
