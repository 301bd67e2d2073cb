#!/usr/bin/env bash
# Issue 15 probe on a GPU host: batch-64 structured-output overhead for variants
# THREADS:MIN_ROWS[:OMP] (xgrammar fill threads; the fill/outputs overlap's row threshold,
# a huge one = off; torch's intra-op threads). After `. .whl/setup.sh`.
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}
SO="--model random:qwen3-0.6b --batch 64 --output-len 128 --backend xgrammar --repeats 3"
for variant in ${VARIANTS:-1:1000000 1:8 8:1000000 8:1000000:1 1:8:1}; do
    IFS=: read -r threads rows omp <<<"$variant"
    omp=${omp:-$(nproc)}
    echo "=== threads $threads, overlap from $rows rows, OMP $omp"
    OMP_NUM_THREADS=$omp TESSELLM_XGRAMMAR_FILL_THREADS=$threads timeout 120 python3 bench/_so_variant.py "$rows" $SO \
        --json "$OUT/so_t${threads}_m${rows}_omp$omp.json" >"$OUT/so_t${threads}_m${rows}_omp$omp.log" 2>&1
    grep overhead_pct "$OUT/so_t${threads}_m${rows}_omp$omp.log" || tail -3 "$OUT/so_t${threads}_m${rows}_omp$omp.log"
done
