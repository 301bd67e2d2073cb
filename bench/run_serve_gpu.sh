#!/usr/bin/env bash
# Issue 16's GPU measurements: `tessellm serve` against `transformers serve
# --continuous-batching` on one bf16 HF folder of random weights in a real shape
# (Llama-3.2-1B), and the server's start-up time (to healthy, to the first completion) with
# an empty and a used cache. Run from the repository root on a CUDA machine after
# `. .whl/setup.sh` (or an install):
#   bash bench/run_serve_gpu.sh checkpoint startup serve
# Logs and JSON go to $OUT (default ./bench-out).
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
CKPT=${CKPT:-/tmp/llama-3.2-1b-hf}
RATES=${RATES:-"4 16 64"}
export PYTHONUNBUFFERED=1 TESSELLM_CACHE=${TESSELLM_CACHE:-/tmp/tessellm-cache}
# shellcheck source=bench/step.sh
. "$(dirname "$0")/step.sh"

for phase in "$@"; do
    case "$phase" in
    checkpoint)  # the random: preset's config and tokenizer, dense bf16 weights as HF saves them
        step checkpoint 120 python3 - "$CKPT" <<'PY'
import os, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.sources.random_weights import MARKER_FILE

target = Path(sys.argv[1])
cache = Path(os.environ["TESSELLM_CACHE"])
source = resolve_model(get_plugins(), "random:llama-3.2-1b", cache).path
shutil.copytree(source, target, dirs_exist_ok=True)
(target / MARKER_FILE).unlink(missing_ok=True)
torch.manual_seed(0)
config = AutoConfig.from_pretrained(target)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(target)
print(sorted(p.name for p in target.iterdir()))
PY
        ;;
    startup)
        step startup 240 python3 bench/serve_startup.py --rounds 2 --model "$CKPT"
        ;;
    serve)
        # Options of the image's transformers (older than this machine's) where it has them.
        transformers serve --help >"$OUT/transformers_serve_help.log" 2>&1
        hf_args=""
        for option in "--device cuda" "--dtype bfloat16"; do
            grep -q -- "${option%% *}" "$OUT/transformers_serve_help.log" && hf_args="$hf_args $option"
        done
        # shellcheck disable=SC2086
        MODEL=$CKPT HF_MODEL=$CKPT HF_ARGS="$hf_args" INPUT_LEN=256 \
            OUTPUT_LEN=128 NUM_PROMPTS=${NUM_PROMPTS:-128} TESSELLM_CPU_COMPILE=off \
            step serve "${SERVE_LIMIT:-330}" bash bench/serve_vs_transformers.sh "$OUT/serve" $RATES
        tail -n 15 "$OUT/serve/transformers_serve.log"
        ;;
    triton_ab)
        # tessellm alone, each run with an empty Triton cache (as a fresh deployment): the
        # tree as it is, then with the eager-path kernels' do_not_specialize lists removed
        # (every per-step integer specialised again, as before 0d6402a).
        # Every compile is logged (bench/triton_compile_log) to triton_compiles_<side>.log.
        kernels=plugins/attention_triton/src/tessellm_attention_triton/kernels
        for side in ${TRITON_SIDES:-unspecialised specialised}; do
            if [ "$side" = specialised ]; then
                for f in "$kernels"/decode.py "$kernels"/prefill.py; do cp "$f" "$f.orig"; done
                sed -i 's/@triton.jit(do_not_specialize=\[[^]]*\])/@triton.jit/' \
                    "$kernels"/decode.py "$kernels"/prefill.py
                grep -c do_not_specialize "$kernels"/decode.py "$kernels"/prefill.py
            fi
            rm -rf "/tmp/triton-$side"
            PYTHONPATH=bench/triton_compile_log:${PYTHONPATH:-} \
                TRITON_COMPILE_LOG=$OUT/triton_compiles_$side.log \
                TRITON_CACHE_DIR=/tmp/triton-$side MODEL=$CKPT PEER= INPUT_LEN=256 OUTPUT_LEN=128 \
                NUM_PROMPTS=${NUM_PROMPTS:-128} TESSELLM_CPU_COMPILE=off \
                step "triton_$side" "${SERVE_LIMIT:-200}" bash bench/serve_vs_transformers.sh \
                "$OUT/triton_$side" $RATES
            echo "compiled variants: $(find "/tmp/triton-$side" -name '*.cubin' | wc -l) cubins"
        done
        for f in "$kernels"/decode.py "$kernels"/prefill.py; do
            if [ -f "$f.orig" ]; then mv "$f.orig" "$f"; fi
        done
        ;;
    esac
done
