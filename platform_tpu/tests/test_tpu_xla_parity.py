"""Greedy tokens on XLA (the TPU platform's compiled steps, on XLA's CPU device here)
equal HF transformers' fp32 greedy tokens: batched, one at a time, with prefix-cache
hits and with preemption. Steps of up to 32 tokens: the prompts are prefilled in chunks."""

from __future__ import annotations

from tpu_xla_support import XLA_ENGINE, require_xla

require_xla()

from tessellm.testing import assert_greedy_parity  # noqa: E402


def test_llama_greedy_tokens_equal_hf_fp32_on_xla(tiny_model_factory):
    model = tiny_model_factory("LlamaForCausalLM")
    assert_greedy_parity(model, max_tokens=24, **XLA_ENGINE)


def test_the_engine_runs_on_xla_through_the_compiled_steps(tiny_model_factory, tessellm_cache_dir):
    from tessellm import LLM

    model = str(tiny_model_factory("LlamaForCausalLM"))
    llm = LLM(model=model, dtype="float32", download_dir=str(tessellm_cache_dir), **XLA_ENGINE)
    try:
        described = llm.engine.describe()
        runner = llm.engine.executor.runner
        assert described["device"].startswith("xla")
        assert described["attention"].splitlines()[0] == "attention: xla"
        assert type(runner.step_runner).__name__ == "XlaStepRunner"
    finally:
        llm.engine.shutdown()
