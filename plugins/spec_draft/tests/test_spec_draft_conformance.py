"""The draft-model proposer through tessellm.testing's conformance: greedy parity with HF
batched, one at a time, with prefix-cache hits and under preemption, drafts proposed,
seeded sampling reproducible, KV freed; for tiny Llama and Qwen3 targets, with the target
itself as the draft, with another random model of the same vocabulary, and with a
weight-only int4 copy of the target (the CPU's quantized self-draft)."""

from __future__ import annotations

import os

import pytest

from tessellm.testing import check_speculative_proposer

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
@pytest.mark.parametrize("draft", ["self", "other", "self_woq_int4"])
def test_conformance(tiny_model_factory, architecture, draft):
    target = tiny_model_factory(architecture)
    spec = {"num_speculative_tokens": 3}
    if draft.startswith("self"):
        draft_dir = target
        if draft == "self_woq_int4":
            spec["quantization"] = "woq_int4"
    else:  # another family's tiny model, other weights, the same tokenizer
        other = "Qwen3ForCausalLM" if architecture == "LlamaForCausalLM" else "LlamaForCausalLM"
        draft_dir = tiny_model_factory(other, seed=1, num_hidden_layers=1)
    result = check_speculative_proposer(
        "draft_model",
        target,
        {"model": str(draft_dir), **spec},
        device="cpu",
    )
    result.raise_for_failures()
    assert result.passed, result.summary()
