"""A grammar the model's vocabulary cannot spell fails that request alone, as a client error
(an HTTP 400), never a 500 and never a stuck request: the tiny Llama's word-level
tokenizer has no token holding the character a regex demands."""

from __future__ import annotations

import re

import pytest

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.step_recovery import FailedRequestOutput
from tessellm.errors import InvalidRequestError
from tessellm.sampling_params import SamplingParams, StructuredOutputsParams

pytest.importorskip("tessellm_structured_xgrammar")


def test_unspellable_regex_fails_its_request_with_a_client_error(tiny_llama):
    engine = LLMEngine(EngineArgs(model=str(tiny_llama), device="cpu", dtype="float32"))
    try:
        text = "".join(engine.tokenizer.get_vocab())
        missing = next(c for c in "0123456789#%&~^@" if c not in text)
        regex = re.escape(missing)
        bad = SamplingParams(max_tokens=4, structured_outputs=StructuredOutputsParams(regex=regex))
        good = SamplingParams(max_tokens=4, temperature=0.0)
        engine.add_request("bad", [1, 5, 6], bad)
        engine.add_request("good", [1, 5, 6], good)
        finals = {}
        for _ in range(50):
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
            if not engine.has_unfinished_requests():
                break
        assert isinstance(finals["bad"], FailedRequestOutput)
        assert isinstance(finals["bad"].error, InvalidRequestError)
        assert "vocabulary" in str(finals["bad"].error)
        assert len(finals["good"].outputs[0].token_ids) == 4
        assert engine.kv_cache_manager.usage() == 0.0
    finally:
        engine.shutdown()
