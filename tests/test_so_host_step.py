"""The host work of a constrained step, cut for batch 64 (bench/structured_host.py): the
sampler takes the engine's bitmask rows as a view of their buffer (no copy), the manager
hands out row views made once per buffer, and the xgrammar matcher keeps its termination
in Python and fills a step's rows in one call; each must give what the slower path gave."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from tessellm.engine.sampler import _stacked_rows
from tessellm.interfaces.structured_output import GrammarSpec, bitmask_words
from tessellm.sources.random_weights import build_tokenizer

VOCAB, EOS = 333, 2
WORDS = bitmask_words(VOCAB)


# -- the sampler's rows ---------------------------------------------------------------------
def test_rows_of_one_buffer_are_taken_as_a_view_of_it():
    buffer = torch.arange(8 * WORDS, dtype=torch.int32).view(8, WORDS)
    rows = buffer.unbind(0)
    stacked = _stacked_rows(list(rows[2:6]))
    assert torch.equal(stacked, buffer[2:6])
    assert stacked.data_ptr() == buffer[2].data_ptr()  # no copy
    single = _stacked_rows([rows[7]])
    assert torch.equal(single, buffer[7:8]) and single.data_ptr() == buffer[7].data_ptr()


@pytest.mark.parametrize("case", ["gap", "order", "two_buffers", "clone", "flat_base"])
def test_rows_not_laid_out_one_after_another_are_copied_in_order(case):
    buffer = torch.arange(8 * WORDS, dtype=torch.int32).view(8, WORDS)
    rows = list(buffer.unbind(0))
    other = (buffer + 1000).unbind(0)
    flat = torch.arange(3 * WORDS, dtype=torch.int32)
    picked = {
        "gap": [rows[0], rows[1], rows[3]],
        "order": [rows[1], rows[0], rows[2]],
        "two_buffers": [rows[0], other[1], rows[2]],
        "clone": [rows[0], rows[1].clone(), rows[2]],
        # slices of a flat tensor: its base is not [rows, words] (still one view)
        "flat_base": [flat[i * WORDS : (i + 1) * WORDS] for i in range(3)],
    }[case]
    stacked = _stacked_rows(picked)
    assert torch.equal(stacked, torch.stack(picked))
    same_storage = stacked.untyped_storage().data_ptr() == picked[0].untyped_storage().data_ptr()
    assert same_storage == (case == "flat_base")


# -- the xgrammar matcher ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def grammar():
    pytest.importorskip("xgrammar")
    from tessellm_structured_xgrammar.backend import XgrammarBackend

    backend = XgrammarBackend(build_tokenizer(300, 1, [EOS]), VOCAB, [EOS])
    return backend.compile(GrammarSpec("json", json.dumps({"enum": ["ab", "abc"]}), False))


def _accept_text(matcher, text: str, tokenizer) -> None:
    for token in tokenizer.encode(text, add_special_tokens=False):
        assert matcher.accept_token(token)


def test_termination_follows_the_end_token_accept_and_rollback(grammar):
    tokenizer = build_tokenizer(300, 1, [EOS])
    matcher = grammar.new_matcher()
    _accept_text(matcher, '"ab"', tokenizer)
    assert not matcher.is_terminated()
    assert matcher.accept_token(EOS) and matcher.is_terminated()
    assert matcher._matcher.is_terminated()  # xgrammar agrees
    assert not matcher.accept_token(EOS)  # nothing after the end
    matcher.rollback(1)
    assert not matcher.is_terminated() and not matcher._matcher.is_terminated()
    assert matcher.accept_token(EOS) and matcher.is_terminated()


def test_one_call_fill_equals_row_by_row_with_ended_rows_among_them(grammar):
    tokenizer = build_tokenizer(300, 1, [EOS])
    matchers = []
    for i, text in enumerate(['"', '"ab', '"ab"', '"abc"', "", '"a']):
        matcher = grammar.new_matcher()
        _accept_text(matcher, text, tokenizer)
        if i in (2, 3):
            assert matcher.accept_token(EOS)  # ended: its row allows the end token only
        matchers.append(matcher)
    alone = torch.zeros(len(matchers), WORDS, dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill_bitmask(alone, row)
    together = torch.full((len(matchers) + 1, WORDS), -7, dtype=torch.int32)
    type(matchers[0]).fill_bitmasks(matchers, together[: len(matchers)])
    assert torch.equal(together[: len(matchers)], alone)
    assert bool((together[-1] == -7).all())
    ended = alone[2]
    assert int(ended.ne(0).sum()) == 1 and (int(ended[0]) >> EOS) & 1


def test_a_matcher_ended_behind_the_flag_still_fills_the_end_row(grammar):
    """Were xgrammar to end a matcher on a token that is not a stop token, its fill raises
    there: the matcher notices and fills the end row instead."""
    tokenizer = build_tokenizer(300, 1, [EOS])
    matcher = grammar.new_matcher()
    _accept_text(matcher, '"ab"', tokenizer)
    assert matcher._matcher.accept_token(EOS)  # behind the wrapper's back
    row = torch.zeros(1, WORDS, dtype=torch.int32)
    matcher.fill_bitmask(row, 0)
    assert matcher.is_terminated()
    assert int(row[0].ne(0).sum()) == 1 and (int(row[0, 0]) >> EOS) & 1


# -- the engine: the same tokens as the row-by-row path -------------------------------------
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "maxItems": 3},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}


def test_engine_tokens_equal_those_of_the_row_by_row_path(tmp_path, monkeypatch):
    """12 constrained requests (greedy and seeded) in one batch, with the batched fill and
    the sampler's view of the rows, then with each row filled alone and the rows stacked
    by copy: the same tokens."""
    pytest.importorskip("xgrammar")
    from tessellm import LLM, SamplingParams
    from tessellm.engine import sampler
    from tessellm.interfaces.structured_output import GrammarMatcher
    from tessellm.sampling_params import StructuredOutputsParams
    from tessellm_structured_xgrammar import backend as backend_module
    from tessellm_structured_xgrammar.backend import XgrammarMatcher

    llm = LLM(
        "random:tiny-llama",
        download_dir=str(tmp_path),
        device="cpu",
        dtype="float32",
        max_num_seqs=12,
    )
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    params = [
        SamplingParams(
            max_tokens=60, structured_outputs=so, temperature=0.0 if i % 3 == 0 else 1.0, seed=i
        )
        for i in range(12)
    ]
    prompts = [f"request {i}:" + " x" * i for i in range(12)]

    def run() -> list[Any]:
        return [o.outputs[0] for o in llm.generate(prompts, params)]

    calls = []
    batch = backend_module._batch
    monkeypatch.setattr(backend_module, "_batch", lambda: calls.append(1) or batch())
    fast = run()
    assert calls  # the one-call fill ran
    monkeypatch.setattr(XgrammarMatcher, "fill_bitmasks", GrammarMatcher.__dict__["fill_bitmasks"])
    monkeypatch.setattr(sampler, "_stacked_rows", lambda rows: torch.stack(rows))
    slow = run()
    assert [list(c.token_ids) for c in fast] == [list(c.token_ids) for c in slow]
    stopped = [c for c in fast if c.finish_reason == "stop"]
    assert stopped
    for completion in stopped:
        jsonschema.validate(json.loads(completion.text), SCHEMA)
