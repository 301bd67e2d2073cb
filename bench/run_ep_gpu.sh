#!/usr/bin/env bash
# Issue 20: expert parallelism against tensor parallelism on 2 GPUs of one host, same call.
# A random-weights MoE of a real shape (Qwen/Qwen3-30B-A3B's config, or Mixtral-8x7B's),
# bf16, TP=2 with and without enable_expert_parallel, throughput then batch-1 latency,
# the two modes interleaved so both see the same machine state.
# Run from the repository root on a machine with 2 CUDA devices after `. .whl/setup.sh`:
#   bash bench/run_ep_gpu.sh qwen3-30b-a3b        (default; ~61 GB of bf16 weights)
#   bash bench/run_ep_gpu.sh mixtral-8x7b         (~93 GB: 47 GB per 80 GB GPU)
# JSON goes to $OUT (default ./bench-out).
set -u
SHAPE=${1:-qwen3-30b-a3b}
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
TESSELLM="python3 -m tessellm.cli.app"
MODEL=/tmp/random-$SHAPE
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}

# shellcheck source=bench/step.sh
. "$(dirname "$0")/step.sh"

# Config fields from each model's config.json on the Hugging Face hub (shapes only).
python3 - "$SHAPE" "$MODEL" <<'EOF' || exit 1
import sys
from pathlib import Path
from tessellm.sources.random_weights import write_random_model

common = {"hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02,
          "use_cache": True, "torch_dtype": "bfloat16", "rope_scaling": None,
          "tie_word_embeddings": False}
shapes = {
    "qwen3-30b-a3b": {
        **common, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
        "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 48, "attention_bias": False, "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "mixtral-8x7b": {
        **common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
        "bos_token_id": 1, "eos_token_id": 2,
    },
}
print(write_random_model(shapes[sys.argv[1]], Path(sys.argv[2])))
EOF

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run_bench() {  # run_bench KIND TIMEOUT_S MODE ARGS...: `tessellm bench KIND` at TP=2, MODE tp or ep
    local kind=$1 limit=$2 mode=$3
    shift 3
    local extra=()
    [ "$mode" = ep ] && extra=(-e enable_expert_parallel=true)
    step "${SHAPE}_${mode}2_$kind" "$limit" $TESSELLM bench "$kind" --model "$MODEL" \
        --dtype bfloat16 --tensor-parallel-size 2 "$@" \
        --max-model-len 2048 --output-json "$OUT/${SHAPE}_${mode}2_$kind.json" "${extra[@]}"
}

for mode in tp ep; do
    run_bench throughput 280 "$mode" --num-prompts 256 --input-len 512 --output-len 256
done
for mode in tp ep; do
    run_bench latency 200 "$mode" --input-len 512 --output-len 128 --num-iters 3
done
