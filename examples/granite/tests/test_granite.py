"""Granite against HF transformers, through tessellm.testing (installed with tessellm as
a pytest plugin: no conftest and no path set-up needed)."""

from __future__ import annotations

import torch

from tessellm import LLM, SamplingParams
from tessellm.plugins import get_plugins
from tessellm.testing import TEST_PROMPTS, assert_greedy_parity, hf_greedy, tiny_model

# Far from 1, so that a multiplier applied in the wrong place (or not at all) changes the
# greedy tokens. Granite 3's own values are of these sizes (12, 0.22, 0.0078125, 8).
MULTIPLIERS = dict(
    embedding_multiplier=6.0,
    residual_multiplier=0.35,
    attention_multiplier=0.09,
    logits_scaling=3.0,
)


def test_the_plugin_registers_granite():
    registration = get_plugins().get("models", "GraniteForCausalLM")
    assert registration is not None
    assert registration.plugin == "granite_example"


def test_granite_matches_hf(tmp_path):
    path = tiny_model("GraniteForCausalLM", tmp_path / "granite", **MULTIPLIERS)
    assert_greedy_parity(path, device="cpu")


def test_the_multipliers_change_the_reference(tmp_path):
    """The parity above is no accident of multipliers that do nothing: the same weights
    without them give other tokens."""
    scaled = tiny_model("GraniteForCausalLM", tmp_path / "scaled", **MULTIPLIERS)
    plain = tiny_model("GraniteForCausalLM", tmp_path / "plain")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scaled)
    prompts = [tok.encode(p) for p in TEST_PROMPTS[:4]]
    assert hf_greedy(scaled, prompts, 12) != hf_greedy(plain, prompts, 12)


def test_logprobs_are_those_of_the_scaled_logits(tmp_path, tessellm_cache_dir):
    """Greedy tokens cannot see ``logits_scaling`` (dividing by a positive constant keeps
    the argmax); log-probabilities can."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model("GraniteForCausalLM", tmp_path / "granite", **MULTIPLIERS)
    prompt = AutoTokenizer.from_pretrained(path).encode(TEST_PROMPTS[1])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], dim=-1)
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        download_dir=str(tessellm_cache_dir),
        enforce_eager=True,  # one token: no decode step to compile
    )
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    (first,) = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].logprobs
    assert len(first) >= 5
    for token, logprob in first.items():
        assert abs(logprob.logprob - expected[token].item()) < 1e-4, token
