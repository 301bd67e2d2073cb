"""Stop strings: found across token boundaries, cut from the text (unless asked to keep
them), never streamed in part, not before min_tokens; then the same on the real engine."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.engine.output_processor import OutputProcessor
from tessellm.interfaces.request import Request

PIECES = ["<s>", "He", "llo", " wo", "rld", "!", " S", "TOP", " the", " end", "ST", "OP"]


class PieceTokenizer:
    """Each token id decodes to a fixed piece of text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids)


def run(tokens: list[int], **params) -> tuple[list, OutputProcessor, Request]:
    """Feed ``tokens`` one step at a time; returns the outputs of every step."""
    proc = OutputProcessor(PieceTokenizer())
    req = Request("r", [0], SamplingParams(max_tokens=len(tokens), **params))
    proc.add("r", None, [req])
    outputs = []
    for token in tokens:
        req.output_token_ids.append(token)
        outs, stopped = proc.process([req], {})
        outputs.append((outs[0], stopped))
        if stopped:
            break
    return outputs, proc, req


HELLO_WORLD = [1, 2, 3, 4, 5, 8, 9]  # "Hello world! the end"


def test_stop_string_across_token_boundaries_is_cut():
    outputs, proc, _ = run(HELLO_WORLD, stop="lo wor")  # spans "llo" | " wo" | "rld"
    final, stopped = outputs[-1]
    assert stopped == ["r"] and len(outputs) == 4
    comp = final.outputs[0]
    assert comp.text == "Hel"
    assert comp.finish_reason == "stop" and comp.stop_reason == "lo wor"
    assert final.finished and not proc.parents


def test_stop_string_kept_when_asked():
    outputs, _, _ = run(HELLO_WORLD, stop=["lo wor"], include_stop_str_in_output=True)
    assert outputs[-1][0].outputs[0].text == "Hello wor"


def test_streamed_text_is_never_retracted():
    # "Hello" would be shown after two tokens, then cut to "Hel": the tail that could
    # still begin a stop string is held back instead.
    outputs, _, _ = run(HELLO_WORLD, stop="lo wor")
    texts = [out.outputs[0].text for out, _ in outputs]
    assert texts[-1] == "Hel"
    assert all(texts[-1].startswith(text) for text in texts)


def test_earliest_stop_string_wins():
    outputs, _, _ = run(HELLO_WORLD, stop=["end", "o"])
    assert outputs[-1][0].outputs[0].text == "Hell"


def test_min_tokens_delays_stop_strings():
    # "STOP" ends in the third token: found with min_tokens=2 ...
    outputs, _, _ = run([1, 10, 11, 2], stop=["STOP"], min_tokens=2)
    assert outputs[-1][0].outputs[0].text == "He" and len(outputs) == 3
    # ... but with min_tokens=3 it is complete before the check starts, and only text
    # added from then on can end a stop string (as in vLLM).
    outputs, _, _ = run([1, 10, 11, 2], stop=["STOP"], min_tokens=3)
    assert outputs[-1][1] == [] and outputs[-1][0].outputs[0].text == "HeSTOP"  # "llo" held


def test_stop_string_inside_one_token():
    outputs, _, _ = run([1, 2, 6, 7, 8], stop=["TO"])
    assert outputs[-1][0].outputs[0].text == "Hello S"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(model=str(tiny_llama), dtype="float32", device="cpu")


def test_engine_stops_on_a_string_spanning_tokens(llm):
    prompt = {"prompt_token_ids": [5, 9, 13, 17]}
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    text = free[0].outputs[0].text
    words = text.split(" ")
    assert len(words) >= 6
    # The end of the third word, the space, and the start of the fourth.
    stop = words[2][-2:] + " " + words[3][:2]
    cut = text.find(stop)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop])
    out = llm.generate(prompt, params)[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert len(out.token_ids) < 16  # the scheduler stopped generating
    kept = SamplingParams(
        temperature=0.0, max_tokens=16, ignore_eos=True, stop=stop, include_stop_str_in_output=True
    )
    assert llm.generate(prompt, kept)[0].outputs[0].text == text[: cut + len(stop)]
    assert llm.engine.stats()["num_running"] == 0


def test_engine_stop_token_ids(llm):
    prompt = {"prompt_token_ids": [5, 9, 13, 17]}
    free = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    params = SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[tokens[2]])
    out = llm.generate(prompt, params)[0].outputs[0]
    assert out.token_ids == tokens[: tokens.index(tokens[2]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == tokens[2]
