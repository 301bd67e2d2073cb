"""The n-gram proposer: what it matches, and the conformance of tessellm.testing (greedy
parity with HF in every mode, for the Llama, Qwen3 and Gemma families)."""

from __future__ import annotations

import numpy as np
import pytest

from tessellm.interfaces.request import Request
from tessellm.interfaces.speculative import SpeculativeConfig
from tessellm.sampling_params import SamplingParams
from tessellm.testing import check_speculative_proposer
from tessellm_spec_ngram.proposer import NgramProposer, find_continuation


def continuation(tokens, lookup_max=4, lookup_min=2, k=3) -> list[int]:
    return find_continuation(np.array(tokens), lookup_max, lookup_min, k).tolist()


def test_the_longest_suffix_wins_over_a_later_shorter_match():
    # "1 2 3" followed by 7 8 9 earlier; "2 3" alone followed by 5 later; suffix "1 2 3".
    tokens = [1, 2, 3, 7, 8, 9, 4, 2, 3, 5, 6, 1, 2, 3]
    assert continuation(tokens) == [7, 8, 9]


def test_the_latest_occurrence_of_the_suffix_is_used():
    tokens = [4, 5, 10, 11, 4, 5, 20, 21, 4, 5]
    assert continuation(tokens, k=2) == [20, 21]


def test_no_match_shorter_than_the_minimum():
    assert continuation([1, 2, 3, 9, 3], lookup_min=2) == []
    assert continuation([1, 2, 3, 9, 3], lookup_min=1) == [9, 3]


def test_the_draft_stops_at_the_end_of_the_tokens():
    # The suffix "6 7" occurred two tokens before the end: only those two can follow.
    assert continuation([6, 7, 6, 7], k=5) == [6, 7]
    assert continuation([1, 2], k=3) == []


def test_the_proposer_follows_a_growing_request():
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=3)
    proposer = NgramProposer(config, context=None)  # type: ignore[arg-type]
    request = Request("r", [1, 2, 3, 4, 1, 2], SamplingParams())
    assert proposer.propose([request], [3]) == [[3, 4, 1]]
    request.output_token_ids += [3, 4]  # tokens only ever append: the buffer catches up
    assert proposer.propose([request], [2]) == [[1, 2]]
    request.output_token_ids += list(range(100, 200))  # past the buffer's first capacity
    assert proposer.propose([request], [3]) == [[]]
    proposer.finished(["r"])
    assert proposer._buffers == {}


@pytest.mark.parametrize(
    "architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM"]
)
def test_conformance(tiny_model_factory, architecture):
    model = tiny_model_factory(architecture)
    result = check_speculative_proposer("ngram", model, {"num_speculative_tokens": 4}, device="cpu")
    result.raise_for_failures()
    assert result.passed, result.summary()
