"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) with its weights kept
quantized: it answers the README's question on the CPU in bf16 (the int4 kernel) and in
fp32 (dequantized per call: the same tokens as the dense load), and loading it takes
less memory than the dense load (peak RSS of a process that only builds the model).

The fp32 comparison with transformers is tests/test_default_model.py's (the engine picks
this method there too).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.config import DEFAULT_MODEL
from tessellm_gguf.method import describe_layer

pytestmark = pytest.mark.slow

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _answer(dtype: str, **kwargs) -> tuple[str, list[int], LLM]:
    llm = LLM(model=DEFAULT_MODEL, dtype=dtype, device="cpu", **kwargs)
    out = llm.chat(QUESTION, GREEDY)[0].outputs[0]
    return out.text, list(out.token_ids), llm


def test_bf16_answer_through_the_int4_kernel():
    text, _, llm = _answer("bfloat16")
    runner = llm.engine.executor.runner
    assert runner.quantization == "gguf"
    layer = runner.model.model.layers[0]
    assert describe_layer(layer.self_attn.qkv_proj) == "Int4KernelSegment"  # Q4_1
    assert describe_layer(layer.mlp.down_proj) == "Int4KernelSegment"
    head = runner.model.lm_head.logits_matmul  # 8-bit groups, and a copy for many rows
    assert (head.blocked or head.dense_copy) is not None  # blocked where oneDNN takes it
    assert "Paris" in text


def test_fp32_answer_equals_the_dense_load():
    # Named: unasked, an fp32 run dequantizes GGUF weights (faster there).
    text, native, llm = _answer("float32", quantization="gguf")
    assert llm.engine.executor.runner.quantization == "gguf"
    head = llm.engine.executor.runner.model.lm_head.logits_matmul  # its blocked copy
    assert head is not None and head.__self__.weight is not None
    del llm, head
    _, dense, _ = _answer("float32", quantization="none")
    assert "Paris" in text
    assert native == dense


@functools.cache  # a load takes ~7 s; two tests measure the same codes-only load
def _load_peak(dtype: str, quantization: str, dense_copies: str = "off") -> dict:
    script = Path(__file__).with_name("load_memory.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TESSELLM_GGUF_CPU_DENSE": dense_copies}
    proc = subprocess.run(
        [sys.executable, str(script), DEFAULT_MODEL, dtype, quantization],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_allocates_no_dense_copy(dtype):
    native = _load_peak(dtype, "gguf")
    dense = _load_peak(dtype, "none")
    assert native["method"] == "gguf" and dense["method"] == "none"
    # The linear weights (80% of the parameters) are kept at ~4.5-6 bits, not 16 or 32.
    assert native["model_mib"] < 0.5 * dense["model_mib"]
    native_growth = native["peak_mib"] - native["baseline_peak_mib"]
    dense_growth = dense["peak_mib"] - dense["baseline_peak_mib"]
    assert native_growth < dense_growth - 0.5 * (dense["model_mib"] - native["model_mib"])


def test_default_keeps_dense_copies_for_many_rows_within_its_budget():
    """By default (``auto``) this small model also keeps a dense copy of each quantized
    matrix (fp32 without AVX-512) for calls over 16 rows: the memory is the trade."""
    from tessellm_gguf.runtime import DENSE_COPY_AUTO_BYTES, dense_copy_dtype

    codes_only = _load_peak("bfloat16", "gguf")
    with_copies = _load_peak("bfloat16", "gguf", dense_copies="auto")
    added_mib = with_copies["model_mib"] - codes_only["model_mib"]
    copy_bytes = dense_copy_dtype(torch.bfloat16).itemsize
    # The ~106M linear weights at 2 or 4 bytes each (the LM head's copy, 28M weights, is
    # held by its matmul object, not a buffer: see test_bf16_answer_through_the_int4_kernel).
    assert 100e6 * copy_bytes / 2**20 < added_mib < DENSE_COPY_AUTO_BYTES / 2**20
