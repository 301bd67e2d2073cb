#!/usr/bin/env bash
# The G2 fusion measurements behind bench/RESULTS.md ("G2 fusions"), one lease call each:
#   bash bench/run_g2_fusions.sh ab       # GPU tests of the fused kernels, GEMV micro-bench,
#                                         # in-process A/B of every lever, rest of GPU tests
#   bash bench/run_g2_fusions.sh confirm  # copy bandwidth, bench latency before/after + HF
#   bash bench/run_g2_fusions.sh all      # ab and confirm's "after" in one call
#   bash bench/run_g2_fusions.sh final    # A/B before vs defaults, copy bandwidth,
#                                         # bench latency + HF
# Run from the repository root on a CUDA machine; wheels in .whl/ (see run_cuda_suite.sh).
# Logs and JSON go to $OUT (default ./bench-out).
set -u
OUT=${OUT:-./bench-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TESSELLM_CACHE=/tmp/tessellm-cache
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # where setup puts the .whl wheels
TESSELLM="python3 -m tessellm.cli.app"
LATENCY="bench latency --model random:llama-3-8b --input-len 512 --output-len 256 --num-iters 3
 --max-model-len 1024"
BEFORE_OPS=add_rms_norm,rms_norm,silu_and_mul,rotary_neox

bash bench/run_cuda_suite.sh setup >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; exit 1; }
tail -n 2 "$OUT/setup.log"

fused_tests() {
    timeout 120 python3 -m pytest -q -x tests/test_fused_gemv.py tests/test_fused_rotary_kv.py \
        tests/test_fused_split_merge.py tests/test_fused_decoder.py 2>&1 | tee "$OUT/tests_fused.log" | tail -n 15
}
levers() {
    timeout 230 python3 bench/g2_fusions.py gemv decode --json "$OUT/fusions.json" \
        >"$OUT/fusions.log" 2>&1
    echo "fusions rc=$?"
    sed -n '/== summary/,$p' "$OUT/fusions.log"
    grep -i -m 5 -e error -e Traceback "$OUT/fusions.log"
}
gpu_tests() {
    timeout 150 python3 -m pytest -q tests/test_cuda.py tests/test_kernels_triton.py \
        tests/test_gemv_triton.py 2>&1 | tee "$OUT/tests_gpu.log" | tail -n 8
    timeout 60 python3 -m pytest -q tests/test_attention_triton.py -k "gpu_split or gpu_graph" 2>&1 \
        | tee -a "$OUT/tests_gpu.log" | tail -n 4
}
copy_bandwidth() {
    python3 -c "import sys; sys.path.insert(0, 'bench'); from cuda_steps import copy_tb_per_s
import torch; print(torch.cuda.get_device_name(0), 'copy TB/s', round(copy_tb_per_s(), 4))" \
        | tee "$OUT/copy.txt"
}
latency_before() {
    TESSELLM_FUSED_OPS=$BEFORE_OPS TESSELLM_TRITON_SPLIT_MERGE=kernel timeout 120 $TESSELLM \
        $LATENCY --output-json "$OUT/g2_before.json" >"$OUT/g2_before.log" 2>&1
    echo "before rc=$?"; grep -v "it/s]" "$OUT/g2_before.log" | tail -n 12
}
latency_after_with_hf() {
    timeout 300 $TESSELLM $LATENCY --baseline hf --output-json "$OUT/g2.json" \
        >"$OUT/g2.log" 2>&1
    echo "after rc=$?"; grep -v "it/s]" "$OUT/g2.log" | tail -n 14
}

case "${1:-}" in
ab) fused_tests; levers; gpu_tests ;;
confirm) copy_bandwidth; latency_before; latency_after_with_hf ;;
all) fused_tests; levers; copy_bandwidth; latency_after_with_hf; gpu_tests ;;
final)
    timeout 120 python3 bench/g2_fusions.py decode --sets before defaults \
        --json "$OUT/fusions_final.json" >"$OUT/fusions_final.log" 2>&1
    echo "fusions rc=$?"; sed -n '/== summary/,$p' "$OUT/fusions_final.log"
    copy_bandwidth; latency_after_with_hf
    ;;
*)
    echo "usage: $0 ab|confirm|all|final"
    exit 2
    ;;
esac
