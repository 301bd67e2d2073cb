"""Structured outputs end to end in the engine with the xgrammar backend (the default) and
llguidance per request: a tiny random Llama with a byte-level tokenizer writes gibberish,
but constrained it writes JSON that validates, text the regex matches, one of the choices.
With n > 1, a small ``max_tokens`` (``"length"``), unconstrained neighbours in the batch
(unaffected), prefix-cache hits, preemption, stop strings, the overlapped and
schedule-ahead loops, and invalid specs (an ``InvalidRequestError`` naming the problem)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from test_so_engine_fake import SO_CORPUS, byte_level_model

from tessellm import LLM, SamplingParams
from tessellm.errors import InvalidRequestError
from tessellm.sampling_params import StructuredOutputsParams

pytest.importorskip("tessellm_structured_xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPTS = ["The capital of France is", "Hello, my name is", SO_CORPUS[2] * 2, "1 2 3"]


def json_params(**kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 80)
    backend = kwargs.pop("backend", None)
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True, backend=backend)
    return SamplingParams(structured_outputs=so, **kwargs)


def assert_valid(completion) -> None:
    assert completion.finish_reason == "stop", completion
    jsonschema.validate(json.loads(completion.text), SCHEMA)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return byte_level_model(tmp_path_factory.mktemp("so-xgrammar"))


@pytest.fixture(scope="module")
def llm(model_path):
    return LLM(model=str(model_path), dtype="float32", device="cpu", max_num_seqs=16)


def test_json_schema_greedy_and_seeded_n3(llm):
    outs = llm.generate(
        PROMPTS[:2], [json_params(temperature=0), json_params(temperature=1.0, seed=5, n=3)]
    )
    completions = [c for o in outs for c in o.outputs]
    assert len(completions) == 4
    for c in completions:
        assert_valid(c)
    assert len({c.text for c in outs[1].outputs}) > 1  # three samples, not one
    # Whitespace allowed: still valid.
    so = StructuredOutputsParams(json=SCHEMA)
    out = llm.generate(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=120, structured_outputs=so)
    )
    assert_valid(out[0].outputs[0])
    assert not llm.engine.structured.matchers


def test_max_tokens_cuts_the_json_with_length(llm):
    c = llm.generate(PROMPTS[0], json_params(temperature=0, max_tokens=4))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 4
    assert c.text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(c.text)


def test_constraint_does_not_leak_into_unconstrained_neighbours(llm):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[1:3], plain)
    regex = StructuredOutputsParams(regex=r"[a-z]{2,5}-\d{2}")
    mixed = llm.generate(
        PROMPTS,
        [
            json_params(temperature=0),
            plain,
            plain,
            SamplingParams(temperature=0, max_tokens=20, structured_outputs=regex),
        ],
    )
    assert [o.outputs[0].token_ids for o in mixed[1:3]] == [o.outputs[0].token_ids for o in alone]
    assert_valid(mixed[0].outputs[0])
    assert re.fullmatch(r"[a-z]{2,5}-\d{2}", mixed[3].outputs[0].text)


def test_regex_and_choice(llm):
    pattern = r"(yes|no), \d{1,3}(\.\d)?"
    options = ["Paris", "London", "Rome 2"]
    outs = llm.generate(
        PROMPTS[:2],
        [
            SamplingParams(
                temperature=1.0,
                seed=2,
                n=2,
                max_tokens=20,
                structured_outputs=StructuredOutputsParams(regex=pattern),
            ),
            SamplingParams(
                temperature=0,
                max_tokens=20,
                structured_outputs=StructuredOutputsParams(choice=options),
            ),
        ],
    )
    for c in outs[0].outputs:
        assert c.finish_reason == "stop" and re.fullmatch(pattern, c.text), c
    assert outs[1].outputs[0].text in options


def test_stop_string_inside_the_constrained_output(llm):
    so = StructuredOutputsParams(choice=["red apple", "green pear"])
    c = llm.generate(PROMPTS[0], SamplingParams(temperature=0, stop=" ", structured_outputs=so))[
        0
    ].outputs[0]
    assert c.text in ("red", "green") and c.finish_reason == "stop" and c.stop_reason == " "


def test_prefix_cache_hits(llm):
    first = llm.generate(PROMPTS[2], json_params(temperature=0))[0]
    second = llm.generate(PROMPTS[2], json_params(temperature=0))[0]
    assert second.num_cached_tokens > 0
    assert_valid(second.outputs[0])
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_preemption_keeps_matchers_valid(llm, model_path):
    params = [json_params(temperature=0), json_params(temperature=1.0, seed=3)] * 2
    small = LLM(
        model=str(model_path),
        dtype="float32",
        device="cpu",
        block_size=4,
        num_gpu_blocks_override=24,
    )
    prompts = [*PROMPTS[:2], PROMPTS[3], "Hello"]  # short: the cache holds 96 tokens
    outs = small.generate(prompts, params)
    assert small.engine.stats()["num_preemptions"] > 0
    for o in outs:
        assert_valid(o.outputs[0])
    reference = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]


@pytest.mark.parametrize(("ahead", "deferred"), [(False, False), (True, True), (True, False)])
def test_overlapped_loops_give_the_serial_outputs(llm, monkeypatch, ahead, deferred):
    """Scheduled ahead, a constrained step samples once its bitmasks are filled (the
    executor defers sampling), or is not scheduled ahead (an executor that cannot)."""
    engine = llm.engine
    if not deferred:
        monkeypatch.setattr(type(engine.executor), "defers_sampling", False)
    # The plain requests outlive the constrained ones: their last steps run ahead.
    plain = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    params = [json_params(temperature=0), plain, json_params(temperature=1.0, seed=9, n=2), plain]
    serial = [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, params)]
    advanced = []
    advance = engine.scheduler.advance

    def spy(plan):
        advanced.append([s.token_bitmask is not None for s in plan.seqs if s.sample])
        return advance(plan)

    engine.scheduler.advance = spy
    engine.overlap_steps, engine.schedule_ahead = True, ahead
    try:
        outs = llm.generate(PROMPTS, params)
        while engine.has_unfinished_requests():
            assert engine.step() == []
    finally:
        engine.overlap_steps = engine.schedule_ahead = False
        del engine.scheduler.advance
    assert [[c.token_ids for c in o.outputs] for o in outs] == serial
    assert bool(advanced) == ahead
    # With deferred sampling constrained steps run ahead too; without, never.
    assert any(any(step) for step in advanced) == deferred
    for o in (outs[0], outs[2]):
        for c in o.outputs:
            assert_valid(c)


@pytest.mark.parametrize(
    ("so", "problem"),
    [
        (
            StructuredOutputsParams(
                json={"type": "object", "properties": {"a": {"type": "nonsense"}}}
            ),
            "nonsense",
        ),
        (StructuredOutputsParams(regex="([a-z"), "regex"),
        (StructuredOutputsParams(grammar="root ::= foo"), 'Rule "foo" is not defined'),
    ],
)
def test_invalid_spec_raises_naming_the_problem_and_the_engine_serves_on(llm, so, problem):
    with pytest.raises(InvalidRequestError, match=re.escape(problem)):
        llm.generate(PROMPTS[:2], [json_params(), SamplingParams(structured_outputs=so)])
    assert not llm.engine.output_processor.parents
    assert_valid(llm.generate(PROMPTS[0], json_params(temperature=0))[0].outputs[0])


def test_llguidance_per_request(llm):
    pytest.importorskip("tessellm_structured_llguidance")
    outs = llm.generate(
        PROMPTS[:2], [json_params(temperature=0, backend="llguidance"), json_params(temperature=0)]
    )
    for o in outs:
        assert_valid(o.outputs[0])
    assert set(llm.engine.structured.compiler._backends) >= {"xgrammar", "llguidance"}


def test_tensor_parallel_workers_get_the_bitmasks(llm, model_path):
    """The plan, bitmask rows included, is pickled to the mp executor's two ranks."""
    params = [json_params(temperature=0), SamplingParams(temperature=0, max_tokens=8)]
    reference = llm.generate(PROMPTS[:2], params)
    tp = LLM(model=str(model_path), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        outs = tp.generate(PROMPTS[:2], params)
    finally:
        tp.engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
    assert_valid(outs[0].outputs[0])
