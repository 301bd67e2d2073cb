#!/usr/bin/env bash
# Issue 16's serving comparison on the CPU: `tessellm serve` (the default model; its
# defaults, and any other configurations named in TESSELLM_CONFIGS) against
# `transformers serve --continuous-batching` on the same weights (an fp32 HF folder,
# $HF_MODEL, made from the default model's converted checkpoint), each measured by
# `tessellm bench serve` at the request rates given.
#
# One server runs at a time (each sizes its KV cache from the free memory: three at once
# ran the machine out of memory); ROUNDS > 1 repeats the whole sequence with the server
# order reversed every other round, so a change in the machine's load between servers
# shows as spread between rounds. Raw JSON per round:
# $OUT/serve_<name>_r<rate>_round<k>.json; the summary (medians over rounds, target
# check) goes to $OUT/summary.txt; each measurement's load average to $OUT/load.txt.
#
# tessellm builds its compiled decode libraries before serving (TESSELLM_CPU_COMPILE=wait:
# the measurement is of the compiled steps, not of the eager fallback while they build),
# so its "ready" time includes a build whenever the tree's sources changed.
#   ROUNDS=2 TESSELLM_CONFIGS="tessellm:;tessellm-fp32:--dtype float32" \
#       bash bench/serve_vs_transformers.sh OUT_DIR 1 2 4
# On a GPU both serve one HF folder (MODEL, also the tokenizer the prompts are drawn from),
# with the workload's shape in INPUT_LEN, OUTPUT_LEN and NUM_PROMPTS, e.g.
#   MODEL=/tmp/llama1b HF_MODEL=/tmp/llama1b HF_ARGS="--device cuda --dtype bfloat16" \
#       INPUT_LEN=256 OUTPUT_LEN=128 NUM_PROMPTS=128 bash bench/serve_vs_transformers.sh OUT 4 16
set -u
OUT=$1
shift
RATES=("$@")
HF_MODEL=${HF_MODEL:-/tmp/smol_hf}
MODEL=${MODEL:-smollm2-135m-instruct}  # what tessellm serves, and the prompts' tokenizer
INPUT_LEN=${INPUT_LEN:-32} OUTPUT_LEN=${OUTPUT_LEN:-64} NUM_PROMPTS=${NUM_PROMPTS:-32}
PORT=${PORT:-8010}  # tessellm configurations on PORT, PORT+1, ...; transformers after them
ROUNDS=${ROUNDS:-1}
# name:extra serve args;name:args... (set and empty: the peer alone)
TESSELLM_CONFIGS=${TESSELLM_CONFIGS-"tessellm:"}
PEER=${PEER-hf}  # set and empty: tessellm's configurations alone
# transformers' own KV cache sizing took ~14 GiB of this 24 GiB machine (and was killed for
# memory once, next to other processes); 512 blocks of 32 tokens hold 16k tokens, over 5
# times what 32 requests of 32 + 64 tokens can need at once.
HF_ARGS=${HF_ARGS:-"--cb-block-size 32 --cb-num-blocks 512"}
mkdir -p "$OUT"

wait_ready() {  # wait_ready URL PID: until it answers 200, at most 1,800 s (a build under load)
    local code errors=0
    for _ in $(seq 3600); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$1")
        [ "$code" = 200 ] && return 0
        kill -0 "$2" 2>/dev/null || break
        # Up but answering 5xx for 30 s is broken, not loading (a GPU call's time is scarce).
        if [ "${code:0:1}" = 5 ]; then errors=$((errors + 1)); else errors=0; fi
        if [ "$errors" -ge 60 ]; then
            echo "server at $1 answers $code for 30 s: giving up" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "server at $1 never became ready" >&2
    return 1
}

bench() {  # bench URL MODEL ARGS...
    local url=$1 model=$2
    shift 2
    tessellm bench serve --base-url "$url" --model "$model" --input-len "$INPUT_LEN" \
        --text-prompts --tokenizer "$MODEL" --no-ignore-eos "$@"
}

names=() ports=() extras=()
IFS=';' read -ra configs <<<"$TESSELLM_CONFIGS"
port=$PORT
for config in "${configs[@]}"; do
    names+=("${config%%:*}") ports+=("$port") extras+=("${config#*:}")
    port=$((port + 1))
done
if [ -n "$PEER" ]; then
    names+=(hf) ports+=("$port") extras+=("$HF_ARGS")
fi

run_server() {  # run_server INDEX ROUND: start it, warm it up, measure every rate, stop it
    local i=$1 round=$2 name=${names[$1]} url=http://127.0.0.1:${ports[$1]} model health pid
    local -a extra
    read -ra extra <<<"${extras[$i]}"
    if [ "$name" = hf ]; then
        # Its /v1/models lists the Hub cache and answers 500 where that folder is missing
        # (a fresh GPU image): an empty one of its own, as the model is a local folder.
        mkdir -p "$OUT/hf-hub-cache"
        HF_HUB_CACHE=$OUT/hf-hub-cache transformers serve --continuous-batching --port "${ports[$i]}" \
            "${extra[@]}" >>"$OUT/transformers_serve.log" 2>&1 &
        model=$HF_MODEL health=$url/v1/models
    else
        TESSELLM_CPU_COMPILE=${TESSELLM_CPU_COMPILE:-wait} tessellm serve "$MODEL" \
            --port "${ports[$i]}" "${extra[@]}" >>"$OUT/${name}_serve.log" 2>&1 &
        model=$MODEL health=$url/health
    fi
    pid=$!
    local t0=$SECONDS
    if wait_ready "$health" "$pid"; then
        echo "$name ready in $((SECONDS - t0)) s (round $round)"
        # Warm-up, not recorded: transformers serve loads the model on its first request.
        # Every measurement draws prompts of its own (seed by round and rate, the same for
        # every server): with one seed, each rate repeated the previous rate's prompts and
        # tessellm's prefix cache served most of them (all results before 2026-12-06 10:50).
        bench "$url/v1" "$model" --num-prompts 2 --output-len 8 --request-rate 1 \
            --seed $((round * 100)) >/dev/null
        local k=0
        for rate in "${RATES[@]}"; do
            k=$((k + 1))
            echo "$name r$rate round$round before: $(date -u +%H:%M:%S) $(cat /proc/loadavg)" >>"$OUT/load.txt"
            bench "$url/v1" "$model" --num-prompts "$NUM_PROMPTS" --output-len "$OUTPUT_LEN" --request-rate "$rate" \
                --seed $((round * 100 + k)) --output-json "$OUT/serve_${name}_r${rate}_round${round}.json" |
                tail -1 | sed "s/^tessellm-server/$name r$rate round$round/"
            echo "$name r$rate round$round after: $(date -u +%H:%M:%S) $(cat /proc/loadavg)" >>"$OUT/load.txt"
        done
    fi
    kill -INT "$pid"
    # transformers serve (5.17, on a GPU) logged its shutdown and then never exited: its
    # continuous-batching thread kept the process up until the call's limit.
    for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid"
}

for round in $(seq "$ROUNDS"); do
    order=("${!names[@]}")
    if ((round % 2 == 0)); then
        order=($(printf '%s\n' "${order[@]}" | tac))
    fi
    for i in "${order[@]}"; do
        run_server "$i" "$round"
    done
done

python - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
# Medians over rounds; the target: TTFT p99 and TPOT p50 at most half of the peer's.
import json, statistics, sys
from collections import defaultdict
from pathlib import Path

runs = defaultdict(list)
for path in sorted(Path(sys.argv[1]).glob("serve_*_r*_round*.json")):
    name, rate, _ = path.stem[len("serve_"):].rsplit("_", 2)
    runs[name, float(rate[1:])].append(json.loads(path.read_text())["rows"][0]["metrics"])
keys = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tok_s"]
med = {k: {m: statistics.median(r[m] for r in v) for m in keys} | {"n": len(v)} for k, v in runs.items()}
for (name, rate), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    line = f"{name:16s} rate {rate:g}: " + "  ".join(f"{k} {m[k]:.1f}" for k in keys)
    peer = med.get(("hf", rate))
    if name != "hf" and peer:
        ttft, tpot = m["ttft_p99_ms"] / peer["ttft_p99_ms"], m["tpot_p50_ms"] / peer["tpot_p50_ms"]
        met = "met" if ttft <= 0.5 and tpot <= 0.5 else "MISSED"
        line += f"  | TTFT p99 {ttft:.2f}x, TPOT p50 {tpot:.2f}x the peer's: {met}"
    print(line + f"  ({m['n']} rounds)")
EOF
