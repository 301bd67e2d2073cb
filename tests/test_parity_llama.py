"""Greedy tokens equal HF transformers' on a tiny random Llama (fp32, CPU)."""

from __future__ import annotations

import pytest
from conftest import hf_greedy

from tessellm import LLM, SamplingParams

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompt_ids(tiny_llama_prompt_ids):
    return tiny_llama_prompt_ids


@pytest.fixture(scope="module")
def reference(tiny_llama, prompt_ids):
    return hf_greedy(tiny_llama, prompt_ids, NEW_TOKENS)


def make_llm(path, **kwargs):
    return LLM(model=str(path), dtype="float32", device="cpu", **kwargs)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_batched_matches_hf(tiny_llama, prompt_ids, reference):
    llm = make_llm(tiny_llama)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(o.outputs[0].finish_reason == "length" for o in outs)


def test_one_at_a_time_matches_hf(tiny_llama, prompt_ids, reference):
    llm = make_llm(tiny_llama, enable_prefix_caching=False)
    for ids, ref in zip(prompt_ids, reference, strict=True):
        out = llm.generate({"prompt_token_ids": ids}, GREEDY)[0]
        assert out.outputs[0].token_ids == ref
