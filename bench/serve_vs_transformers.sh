#!/usr/bin/env bash
# Issue 16's serving comparison on the CPU: `tessellm serve` (the default model, its
# defaults) and then `transformers serve --continuous-batching` on the same weights (an fp32
# HF folder, $HF_MODEL, made from the default model's converted checkpoint), each measured
# by `tessellm bench serve` at the request rates given, one server at a time.
#   bash bench/serve_vs_transformers.sh OUT_DIR 1 4
set -u
OUT=$1
shift
HF_MODEL=${HF_MODEL:-/tmp/smol_hf}
mkdir -p "$OUT"

wait_ready() {  # wait_ready URL: until it answers 200, at most 300 s
    for _ in $(seq 600); do
        curl -sf "$1" >/dev/null && return 0
        sleep 0.5
    done
    echo "server at $1 never became ready" >&2
    return 1
}

measure() {  # measure NAME URL MODEL
    local name=$1 url=$2 model=$3
    # Warm-up, not recorded: transformers serve loads the model on its first request.
    tessellm bench serve --base-url "$url" --model "$model" --num-prompts 2 --input-len 32 \
        --output-len 8 --text-prompts --tokenizer smollm2-135m-instruct --no-ignore-eos \
        --request-rate 1 >/dev/null
    for rate in "${RATES[@]}"; do
        tessellm bench serve --base-url "$url" --model "$model" --num-prompts 32 --input-len 32 \
            --output-len 64 --text-prompts --tokenizer smollm2-135m-instruct --no-ignore-eos \
            --request-rate "$rate" --output-json "$OUT/serve_${name}_r${rate}.json" | tail -4
    done
}

RATES=("$@")
tessellm serve --port 8010 >"$OUT/tessellm_serve.log" 2>&1 &
pid=$!
t0=$SECONDS
wait_ready http://127.0.0.1:8010/health && echo "tessellm ready in $((SECONDS - t0)) s"
measure tessellm http://127.0.0.1:8010/v1 smollm2-135m-instruct
kill -INT $pid
wait $pid

transformers serve --continuous-batching --port 8011 >"$OUT/transformers_serve.log" 2>&1 &
pid=$!
t0=$SECONDS
wait_ready http://127.0.0.1:8011/v1/models && echo "transformers ready in $((SECONDS - t0)) s"
measure hf http://127.0.0.1:8011/v1 "$HF_MODEL"
kill -INT $pid
wait $pid
