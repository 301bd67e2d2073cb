#!/usr/bin/env bash
# Issue 17's CUDA measurement: batch-1 latency of random:llama-3-8b without speculation and
# with a self-draft (the draft is the target: every draft accepted at temperature 0, which
# measures the verification cost and the ceiling), k = 4, same call. JSON to $OUT.
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}
SELF='{"method": "draft_model", "model": "random:llama-3-8b", "num_speculative_tokens": 4}'
NGRAM='{"method": "ngram", "num_speculative_tokens": 4}'
for name in none self ngram; do
    extra=()
    [ "$name" = self ] && extra=(-e "speculative_config=$SELF")
    [ "$name" = ngram ] && extra=(-e "speculative_config=$NGRAM")
    echo "=== spec_$name ($(date +%T))"
    timeout "${SPEC_LIMIT:-150}" python3 -m tessellm.cli.app bench latency --model random:llama-3-8b \
        --input-len 512 --output-len 256 --num-iters 3 --max-model-len 1024 \
        --output-json "$OUT/spec_$name.json" "${extra[@]}" >"$OUT/spec_$name.log" 2>&1
    echo "=== spec_$name rc=$?"
    grep -v "it/s]" "$OUT/spec_$name.log" | tail -n 6
done
