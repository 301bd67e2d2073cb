#!/usr/bin/env bash
# Issue 16's 64 req/s TTFT stall on the GPU: where a slow first token waited. One
# `tessellm serve` of the random Llama-3.2-1B folder (bench/run_serve_gpu.sh checkpoint),
# four 64 req/s runs of 64 requests (256-token text prompts, 128 output tokens), and for
# each: the client's TTFT p99 and its own event-loop lag (bench serve), the server's TTFT
# histogram before and after (from arrival at the HTTP handler: /metrics), the requests
# slower than 100 ms, and every engine step over 20 ms (bench/triton_compile_log's
# TESSELLM_STEP_LOG). A slow client TTFT without a slow server one is the client's or the
# connection's; one without a slow step waited outside the steps. Run from the repository
# root on a CUDA machine: bash bench/gpu_ttft_probe.sh (output in $OUT/r).
set -u
. .whl/setup.sh >/dev/null 2>&1
export OUT=$OUT/r; mkdir -p $OUT
[ -f /tmp/llama-3.2-1b-hf/model.safetensors ] || bash bench/run_serve_gpu.sh checkpoint >/dev/null
export TESSELLM_CACHE=/tmp/tessellm-cache PYTHONPATH=$PWD/bench/triton_compile_log:$PYTHONPATH TESSELLM_STEP_LOG=$OUT/steps.log TESSELLM_STEP_LOG_MS=20
M=/tmp/llama-3.2-1b-hf
tessellm serve $M --port 8100 > $OUT/serve.log 2>&1 &
pid=$!
for i in $(seq 240); do curl -sf localhost:8100/health >/dev/null && break; sleep 0.5; done
echo "ready after $((i/2)) s"
B="tessellm bench serve --base-url http://127.0.0.1:8100/v1 --model $M --input-len 256 --text-prompts --tokenizer $M --no-ignore-eos --output-len 128"
$B --num-prompts 2 --request-rate 1 --seed 100 --output-len 8 > /dev/null
ttft() { curl -s localhost:8100/metrics | grep '^tessellm:time_to_first_token_seconds_bucket' | sed 's/tessellm:time_to_first_token_seconds_bucket//' | tr '\n' ' '; echo; }
for seed in 2 3 4 5; do
  echo "server TTFT buckets before: $(ttft)"
  $B --num-prompts 64 --request-rate 64 --seed $seed --output-json $OUT/r64_s$seed.json | tail -1
  echo "server TTFT buckets after: $(ttft)"
done
kill -INT $pid; wait $pid
python3 - $OUT <<'PY'
import json, sys, glob
for f in sorted(glob.glob(sys.argv[1] + "/r64_s*.json")):
    d = json.load(open(f)); m = d["rows"][0]["metrics"]
    slow = [(i, r["sent_s"], r["ttft_ms"]) for i, r in enumerate(d["requests"]) if r["ttft_ms"] > 100]
    print(f.split("/")[-1], "ttft p99", round(m["ttft_p99_ms"], 1), "lag p99/max", round(m["client_lag_p99_ms"], 1), round(m["client_lag_max_ms"], 1), "slow", slow)
PY
cat $OUT/steps.log | tail -20
