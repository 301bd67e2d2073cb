"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) against HF."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_continuation

from tessellm import LLM, SamplingParams
from tessellm.config import DEFAULT_MODEL, EngineArgs
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def gguf_path():
    return resolve_model(get_plugins(), DEFAULT_MODEL, EngineArgs().cache_dir).path


@pytest.fixture(scope="module")
def llm():
    return LLM(model=DEFAULT_MODEL, dtype="float32", device="cpu")


def test_greedy_chat_answer_matches_hf(gguf_path, llm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    ours = out[0].outputs[0].token_ids
    assert len(ours) == NEW_TOKENS

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == out[0].prompt_token_ids
    assert ours == hf_continuation(model, list(ids), NEW_TOKENS)
    assert "Paris" in out[0].outputs[0].text


def test_chat_stops_at_end_of_turn(llm):
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert "Paris" in out.text
    assert "<|im_end|>" not in out.text
