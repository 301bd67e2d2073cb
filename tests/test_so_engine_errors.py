"""How structured-output failures reach requests and callers, through the grammar backend of
``test_so_engine_fake``: a spec that does not compile (a request added directly fails alone),
an unknown backend or a kind it cannot compile, a matcher that raises while filling or
accepting (only its request fails), a grammar that ``min_tokens`` cannot satisfy, and choosing
a backend when none or several are installed.

Apart from ``test_so_engine_fake`` (the happy paths: compiles off the step loop, the cache,
the sampler's bitmasks) so that each file reads as one theme; the backend and fixtures are
imported from there, as the other ``test_so_engine_*`` files do."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_so_engine_fake import CHOICES, FAULTS, ChoiceBackend, _reset, choice, llm  # noqa: F401

from tessellm import LLM, SamplingParams
from tessellm.engine.step_recovery import FailedRequestOutput, RequestFailedError
from tessellm.errors import ConfigError, InvalidRequestError
from tessellm.sampling_params import StructuredOutputsParams


def test_compile_failure_of_a_request_added_directly_finishes_it_with_the_error(llm):  # noqa: F811 - the fixture
    engine = llm.engine
    engine.add_request("bad", "A", choice(["x", ""]))
    engine.add_request("good", "A", choice(temperature=0))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step())
    assert isinstance(outs["bad"], FailedRequestOutput)
    assert isinstance(outs["bad"].error, InvalidRequestError)
    assert "empty string" in str(outs["bad"].error) and outs["bad"].finished
    assert outs["good"].outputs[0].text in CHOICES


def test_unknown_backend_and_unsupported_kind(llm, tiny_llama):  # noqa: F811 - the fixture
    with pytest.raises(InvalidRequestError, match=r"unknown structured_outputs.backend 'nope'"):
        llm.generate("A", SamplingParams(structured_outputs=StructuredOutputsParams(
            choice=["a"], backend="nope")))  # fmt: skip
    with pytest.raises(InvalidRequestError, match="cannot compile 'regex'"):
        llm.generate(
            "A",
            SamplingParams(
                structured_outputs=StructuredOutputsParams(regex="a+", backend="fake_choice")
            ),
        )
    with pytest.raises(ConfigError, match="structured_outputs_backend 'nope'"):
        LLM(model=str(tiny_llama), device="cpu", structured_outputs_backend="nope")


@pytest.mark.parametrize("where", ["fill", "accept"])
def test_a_failing_matcher_fails_its_request_alone(llm, where):  # noqa: F811 - the fixture
    engine = llm.engine
    FAULTS["boom"] = where
    engine.add_request("bad", "A", choice(["boom", "bang"], temperature=0))
    engine.add_request("good", "A", choice(temperature=0))
    engine.add_request("plain", "A", SamplingParams(temperature=0, max_tokens=5))
    outs = {}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step())
    assert isinstance(outs["bad"], FailedRequestOutput)
    assert isinstance(outs["bad"].error, RequestFailedError)
    assert "matcher fault" in str(outs["bad"].error)
    assert outs["good"].outputs[0].text in CHOICES
    assert len(outs["plain"].outputs[0].token_ids) == 5
    assert not engine.structured.matchers


def test_a_grammar_min_tokens_cannot_satisfy_fails_the_request_clearly(llm):  # noqa: F811 - the fixture
    out = llm.generate("A", choice(["a"], temperature=0, min_tokens=5, max_tokens=8))[0]
    assert isinstance(out, FailedRequestOutput)
    assert "grammar does not allow it" in str(out.error)
    assert llm.generate("A", choice(temperature=0))[0].outputs[0].text in CHOICES


def test_backend_choice_and_the_errors_without_one():
    from tessellm.config import EngineArgs
    from tessellm.engine.structured_output import StructuredOutputManager
    from tessellm.plugins import PluginSet, Registration

    def manager(names: list[str], default: str = "auto") -> StructuredOutputManager:
        plugins = PluginSet()
        plugins.registries["structured_output_backends"] = {
            n: Registration("structured_output_backends", n, Broken, "test") for n in names
        }
        args = EngineArgs(structured_outputs_backend=default)
        return StructuredOutputManager(plugins, None, 64, [2], args)

    class Broken(ChoiceBackend):
        def __init__(self, *args: Any) -> None:
            raise OSError("no vocabulary")

    so = StructuredOutputsParams(choice=["a"])
    with pytest.raises(InvalidRequestError, match="install tessellm-structured-xgrammar"):
        manager([]).backend_name(so)
    with pytest.raises(ConfigError, match="no structured output backend is installed"):
        manager([], default="xgrammar")
    assert manager(["zz", "llguidance"]).backend_name(so) == "llguidance"
    assert manager(["zz", "llguidance", "xgrammar"]).backend_name(so) == "xgrammar"
    assert manager(["zz"]).backend_name(so) == "zz"
    assert manager(["zz", "xgrammar"], default="zz").backend_name(so) == "zz"
    broken = manager(["zz"])
    error = broken.submit(so).exception(timeout=10)
    assert isinstance(error, RequestFailedError) and "no vocabulary" in str(error)
    for _ in range(100):  # the future's callbacks run just after its waiters wake
        if not broken.compiler._cache:
            break
        time.sleep(0.01)
    assert not broken.compiler._cache  # a failure is not cached
    broken.shutdown()
