"""The real default model with the n-gram proposer, asked to repeat a given text: drafts
are accepted, and the greedy text is the one it writes without speculation."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.config import DEFAULT_MODEL

pytestmark = pytest.mark.slow
pytest.importorskip("tessellm_spec_ngram")

PARAGRAPH = (
    "The city council met on Tuesday to discuss the new park. Residents asked for more "
    "trees, a playground and better lighting along the river path."
)
EDIT = [
    {
        "role": "user",
        "content": f"Repeat this text exactly, changing 'Tuesday' to 'Friday':\n\n{PARAGRAPH}",
    }
]


def test_ngram_accepts_drafts_and_keeps_the_greedy_text():
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = LLM(model=DEFAULT_MODEL, dtype="float32", device="cpu")
    want = plain.chat(EDIT, params)[0].outputs[0]
    plain.engine.shutdown()
    spec = LLM(
        model=DEFAULT_MODEL,
        dtype="float32",
        device="cpu",
        speculative_config={"method": "ngram", "num_speculative_tokens": 4},
    )
    got = spec.chat(EDIT, params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    assert "river" in got.text  # it did copy the paragraph
    stats = spec.engine.stats()
    assert stats["spec_decode_acceptance_rate"] > 0.3
    assert stats["steps"] < len(got.token_ids)  # fewer target steps than tokens
