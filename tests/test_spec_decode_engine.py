"""Speculative decoding in the engine (the n-gram proposer): every sampling feature gives
the same output as without speculation — logprobs, penalties, min_tokens, stop strings and
stop tokens, max_tokens, n > 1 — seeded sampling is reproducible whatever the batch, a
constrained request decodes beside speculating ones, and bad configurations are errors."""

from __future__ import annotations

import pytest
from test_so_engine_fake import SO_CORPUS, byte_level_model

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError
from tessellm.sampling_params import StructuredOutputsParams

pytest.importorskip("tessellm_spec_ngram")

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1}
PROMPTS = [SO_CORPUS[0] * 3, "abc abc abc abc ab", SO_CORPUS[1] + SO_CORPUS[1][:20]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return byte_level_model(tmp_path_factory.mktemp("spec-engine"))


@pytest.fixture(scope="module")
def plain(model_path):
    return LLM(model=str(model_path), dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def spec(model_path):
    return LLM(model=str(model_path), dtype="float32", device="cpu", speculative_config=NGRAM)


def summary(outputs) -> list[tuple]:
    rows = []
    for out in outputs:
        for c in out.outputs:
            logprobs = None
            if c.logprobs is not None:
                logprobs = [
                    sorted((t, round(lp.logprob, 4)) for t, lp in entry.items())
                    for entry in c.logprobs
                ]
            rows.append((c.text, tuple(c.token_ids), c.finish_reason, c.stop_reason, logprobs))
    return rows


FEATURES = {
    "greedy logprobs": SamplingParams(temperature=0, max_tokens=24, logprobs=2),
    "penalties": SamplingParams(
        temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.4
    ),
    "presence": SamplingParams(temperature=0, max_tokens=24, presence_penalty=0.8),
    "min_tokens and stop tokens": SamplingParams(
        temperature=0, max_tokens=24, min_tokens=6, stop_token_ids=[32, 101, 97]
    ),
    "short max_tokens": SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    "greedy n=2": SamplingParams(temperature=0, max_tokens=16, n=2),
    # Drafts are checked against the very token the sampler draws: seeded outputs match too.
    "seeded sampling n=2": SamplingParams(temperature=0.8, seed=5, max_tokens=24, n=2),
    "seeded top-k top-p logprobs": SamplingParams(
        temperature=1.2, top_k=20, top_p=0.9, seed=9, max_tokens=24, logprobs=1
    ),
}


@pytest.mark.parametrize("name", list(FEATURES))
def test_outputs_equal_those_without_speculation(plain, spec, name):
    params = FEATURES[name]
    assert summary(spec.generate(PROMPTS, params)) == summary(plain.generate(PROMPTS, params))


def test_stop_strings_found_inside_accepted_drafts(plain, spec):
    base = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    texts = [c.text for c in summary_texts(plain.generate(PROMPTS, base))]
    # Stop at a piece each greedy continuation is known to contain, some way in.
    for prompt, text in zip(PROMPTS, texts, strict=True):
        stop = text[9:12]
        params = SamplingParams(temperature=0, max_tokens=32, stop=[stop], ignore_eos=True)
        want = summary(plain.generate(prompt, params))
        assert summary(spec.generate(prompt, params)) == want
        assert want[0][2] == "stop"


def summary_texts(outputs):
    return [out.outputs[0] for out in outputs]


def test_drafts_were_accepted(spec):
    spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stats = spec.engine.stats()
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert 0 < stats["spec_decode_acceptance_rate"] <= 1
    assert stats["spec_decode_mean_accepted_length"] > 1
    assert stats["kv_cache_usage"] == 0.0


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(spec):
    seeded = SamplingParams(temperature=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    other = SamplingParams(temperature=0.9, max_tokens=20, ignore_eos=True)
    alone = spec.generate(PROMPTS[1], seeded)[0].outputs[0].token_ids
    batched = spec.generate(PROMPTS, [other, seeded, other])[1].outputs[0].token_ids
    assert alone == batched


def test_a_constrained_request_decodes_beside_speculating_ones(plain, spec):
    pytest.importorskip("tessellm_structured_xgrammar")
    options = ["abc abc", "Paris"]
    so = SamplingParams(
        temperature=0, max_tokens=12, structured_outputs=StructuredOutputsParams(choice=options)
    )
    greedy = SamplingParams(temperature=0, max_tokens=24)
    outs = spec.generate(PROMPTS, [so, greedy, greedy])
    assert outs[0].outputs[0].text in options
    assert summary(outs[1:]) == summary(plain.generate(PROMPTS[1:], greedy))


def test_speculation_pauses_for_large_batches(model_path):
    config = {**NGRAM, "disable_by_batch_size": 2}
    llm = LLM(model=str(model_path), dtype="float32", device="cpu", speculative_config=config)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm.generate(PROMPTS, params)  # three running together: above the limit
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] == 0
    llm.generate(PROMPTS[:2], params)
    assert llm.engine.stats()["spec_decode_num_draft_tokens"] > 0


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"method": "nope"}, "unknown speculative method 'nope' (installed: "),
        ('{"method": "ngram", ', "not valid JSON"),
        ({"method": "ngram", "num_speculative_token": 3}, "unknown speculative_config field"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "must be an integer"),
        ({"num_speculative_tokens": 3}, "needs a 'method'"),
    ],
)
def test_bad_configurations_are_clear_errors(model_path, config, message):
    with pytest.raises(ConfigError, match=None) as info:
        LLM(model=str(model_path), dtype="float32", device="cpu", speculative_config=config)
    assert message in str(info.value)


def test_metrics_endpoint_exports_the_counters(spec):
    pytest.importorskip("prometheus_client")
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from tessellm.server.metrics import ServerMetrics

    spec.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    text = generate_latest(ServerMetrics(SimpleNamespace(stats=spec.engine.stats())).registry)
    lines = dict(
        line.rsplit(" ", 1) for line in text.decode().splitlines() if not line.startswith("#")
    )
    accepted = float(lines["tessellm:spec_decode_num_accepted_tokens_total"])
    assert accepted == spec.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert float(lines["tessellm:spec_decode_num_draft_tokens_total"]) >= accepted
