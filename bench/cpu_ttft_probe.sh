#!/usr/bin/env bash
# Where the CPU server's first tokens wait at 4 req/s: `tessellm serve` of the default model
# with every engine step logged (bench/triton_compile_log's TESSELLM_STEP_LOG), three
# runs of issue 16's CPU workload (32 requests, 32-token text prompts, 64 output tokens),
# then each run's slowest requests beside the steps they waited through
# (bench/ttft_vs_steps.py). Run from the repository root with the machine otherwise idle:
#   bash bench/cpu_ttft_probe.sh OUT_DIR [extra serve arguments]
set -u
OUT=$1
shift
PORT=${PORT:-8600}
MODEL=smollm2-135m-instruct
mkdir -p "$OUT"
rm -f "$OUT/steps.log"
PYTHONPATH=$PWD/bench/triton_compile_log${PYTHONPATH:+:$PYTHONPATH} TESSELLM_STEP_LOG=$OUT/steps.log \
    TESSELLM_STEP_LOG_MS=0 TESSELLM_CPU_COMPILE=wait tessellm serve $MODEL --port "$PORT" "$@" \
    >"$OUT/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1200); do curl -sf "localhost:$PORT/health" >/dev/null && break; sleep 0.5; done
bench() {
    tessellm bench serve --base-url "http://127.0.0.1:$PORT/v1" --model $MODEL --input-len 32 \
        --text-prompts --tokenizer $MODEL --no-ignore-eos "$@"
}
bench --num-prompts 2 --output-len 8 --request-rate 1 --seed 100 >/dev/null
for seed in 103 203 303; do
    bench --num-prompts 32 --output-len 64 --request-rate 4 --seed $seed \
        --output-json "$OUT/r4_s$seed.json" | tail -1
done
kill -INT $pid
wait $pid
python bench/ttft_vs_steps.py "$OUT/steps.log" "$OUT"/r4_s*.json
