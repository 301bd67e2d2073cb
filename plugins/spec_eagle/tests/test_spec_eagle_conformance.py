"""The EAGLE proposer through tessellm.testing's conformance: greedy parity with HF
batched, one at a time, with prefix-cache hits and under preemption, drafts proposed,
seeded sampling reproducible, KV freed; for tiny Llama, Qwen3 and Gemma 3 targets with a random
head in the EAGLE-LLaMA layout (its guesses are rarely accepted: acceptance on a random
head means nothing, the outputs are what is checked)."""

from __future__ import annotations

import os

import pytest

from tessellm.testing import check_speculative_proposer
from tessellm_spec_eagle.checkpoint import save_random_eagle_head

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model


@pytest.mark.parametrize(
    "architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"]
)
def test_conformance(tiny_model_factory, tmp_path, architecture):
    target = tiny_model_factory(architecture)
    head = save_random_eagle_head(target, tmp_path / "head", seed=5)
    result = check_speculative_proposer(
        "eagle",
        target,
        {"model": str(head), "num_speculative_tokens": 3},
        device="cpu",
    )
    result.raise_for_failures()
    assert result.passed, result.summary()
