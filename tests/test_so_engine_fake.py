"""The engine's structured-output seam, through a grammar backend written here: a
``choice`` language over a byte-level tokenizer (each token's text must extend a prefix
of an allowed string; EOS once the text is one). It exercises what any backend plugin
relies on: compiles off the step loop (requests parked meanwhile, others running), the
compile cache, the bitmask reaching the sampler (padding columns included), matchers fed
the sampled tokens, n > 1, the serial and overlapped loops, and the model's vocabulary
wider than the tokenizer's. Errors attributed to their request are in
``test_so_engine_errors``.

``byte_level_model`` and ``SO_CORPUS`` are shared with the other ``test_so_engine_*``
files: tests need a tokenizer that can spell JSON, which the word-level test tokenizer
cannot."""

from __future__ import annotations

import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from tessellm import LLM, SamplingParams, hookimpl
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.structured_output import (
    CompiledGrammar,
    GrammarMatcher,
    GrammarSpec,
    StructuredOutputBackend,
    StructuredOutputCapabilities,
)
from tessellm.plugins import get_plugins, register_plugin
from tessellm.sampling_params import StructuredOutputsParams

SO_CORPUS = [
    '{"name": "Alice", "age": 30, "tags": ["a", "b"], "ok": true, "value": null}',
    '{"id": 12, "price": 3.5, "items": [{"x": 1}, {"y": -2}], "note": "yes"}',
    "The capital of France is Paris. Hello, my name is Bob. 1 2 3 4 5 6",
    "red green blue yes no maybe 0123456789 abcdefghijklmnopqrstuvwxyz",
]
TOKENIZER_SIZE = 300  # the model's vocabulary is wider: padding columns must stay masked
MODEL_VOCAB = 320
EOS = 2


def byte_level_model(path: Path, **overrides: Any) -> Path:
    """A tiny random Llama (``tessellm.testing.tiny_model``, as ``tiny_model_factory``
    makes them) whose tokenizer is byte-level BPE (any text encodes), trained here on
    ``SO_CORPUS`` (deterministic, milliseconds); ids 0-2 are <unk>, <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tessellm.testing import tiny_model

    tiny_model(
        "LlamaForCausalLM",
        path,
        vocab_size=MODEL_VOCAB,
        eos_token_id=EOS,
        bos_token_id=1,
        **overrides,
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_SIZE,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SO_CORPUS * 10, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / stale).unlink(missing_ok=True)
    fast.save_pretrained(path)
    return path


def pack(token_ids: list[int], words: int) -> torch.Tensor:
    """One bitmask row allowing ``token_ids`` (int32 words, bit j of word i = 32i + j)."""
    row = [0] * words
    for t in token_ids:
        row[t // 32] |= 1 << (t % 32)
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in row], dtype=torch.int32)


# -- the backend --------------------------------------------------------------------------
class Gate:
    """Holds compiles back while closed (to see requests parked)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.compiles: list[GrammarSpec] = []


GATE = Gate()
FAULTS: dict[str, str] = {}  # choice text -> "fill" or "accept": its matcher raises there


class ChoiceMatcher(GrammarMatcher):
    def __init__(self, grammar: ChoiceGrammar) -> None:
        self.grammar = grammar
        self.history: list[int] = []
        self.text = ""
        self.done = False

    def _allowed(self) -> list[int]:
        g = self.grammar
        if self.done:
            return []
        ids = [
            t
            for t, piece in enumerate(g.pieces)
            if piece and any(c.startswith(self.text + piece) for c in g.choices)
        ]
        return ids + list(g.eos) if self.text in g.choices else ids

    def accept_token(self, token_id: int) -> bool:
        if FAULTS.get(self.grammar.choices[0]) == "accept":
            raise RuntimeError("matcher fault on accept")
        if token_id not in self._allowed():
            return False
        self.history.append(token_id)
        if token_id in self.grammar.eos:
            self.done = True
        else:
            self.text += self.grammar.pieces[token_id]
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if FAULTS.get(self.grammar.choices[0]) == "fill":
            raise RuntimeError("matcher fault on fill")
        bitmask[row] = pack(self._allowed(), bitmask.shape[1])

    def rollback(self, num_tokens: int) -> None:
        for token in self.history[len(self.history) - num_tokens :]:
            if token in self.grammar.eos:
                self.done = False
            else:
                self.text = self.text[: len(self.text) - len(self.grammar.pieces[token])]
        del self.history[len(self.history) - num_tokens :]

    def is_terminated(self) -> bool:
        return self.done


class ChoiceGrammar(CompiledGrammar):
    def __init__(self, choices: list[str], pieces: list[str], eos: tuple[int, ...]) -> None:
        self.choices, self.pieces, self.eos = choices, pieces, eos

    def new_matcher(self) -> GrammarMatcher:
        return ChoiceMatcher(self)


class ChoiceBackend(StructuredOutputBackend):
    name = "fake_choice"
    capabilities = StructuredOutputCapabilities(kinds=("choice",))

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Any) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        special = set(tokenizer.all_special_ids)
        self.pieces = ["" if t in special else tokenizer.decode([t]) for t in range(len(tokenizer))]

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        GATE.open.wait(30)
        GATE.compiles.append(spec)
        choices = spec.json_value()
        if any(not c for c in choices):
            raise ValueError("choice 2 is the empty string")
        return ChoiceGrammar(choices, self.pieces, self.eos_token_ids)


plugin = types.ModuleType("so_engine_fake_backend")
plugin.TESSELLM_PLUGIN_API = ">=1.0,<2"  # type: ignore[attr-defined]
plugin.register_structured_output_backends = hookimpl(  # type: ignore[attr-defined]
    lambda register: register("fake_choice", ChoiceBackend)
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    register_plugin(plugin, "so_engine_fake_backend")
    try:
        yield LLM(
            model=str(byte_level_model(tmp_path_factory.mktemp("so-fake"))),
            dtype="float32",
            device="cpu",
            max_num_seqs=8,
            structured_outputs_backend="fake_choice",
        )
    finally:
        get_plugins(refresh=True)


@pytest.fixture(autouse=True)
def _reset():
    GATE.open.set()
    GATE.compiles.clear()
    FAULTS.clear()
    yield
    GATE.open.set()
    FAULTS.clear()


CHOICES = ["red", "green", "blue"]


def choice(options: list[str] = CHOICES, **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("max_tokens", 12)
    return SamplingParams(structured_outputs=StructuredOutputsParams(choice=options), **kwargs)


def test_choice_output_greedy_and_seeded_n3(llm):
    outs = llm.generate(
        ["Hello, my name is", "The capital of France is"],
        [choice(temperature=0), choice(temperature=1.0, seed=7, n=3)],
    )
    completions = [c for o in outs for c in o.outputs]
    assert len(completions) == 4
    for c in completions:
        assert c.text in CHOICES and c.finish_reason == "stop", c
    # Nothing left behind: every matcher released with its request.
    assert not llm.engine.structured.matchers and not llm.engine.structured.parked


def test_request_waits_for_its_grammar_without_stalling_others(llm):
    engine = llm.engine
    GATE.open.clear()
    options = ["yes", "no", "maybe"]
    engine.add_request("slow", "Hello, my name is", choice(options, temperature=0))
    engine.add_request("free", "The capital of France is", SamplingParams(max_tokens=4))
    assert engine.scheduler.stats()["num_waiting"] == 1  # "slow" is parked, not queued
    finished = {}
    while "free" not in finished:
        for out in engine.step():
            finished[out.request_id] = out
    assert "slow" not in finished and engine.has_unfinished_requests()
    GATE.open.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out
    assert finished["slow"].outputs[0].text in options


def test_compile_cache_and_failures_are_not_cached(llm):
    llm.generate("A", choice(["yes", "no"], temperature=0))
    llm.generate("A", choice(["yes", "no"], temperature=0))
    bad = choice(["ok", "", "no"])
    for _ in range(2):
        with pytest.raises(InvalidRequestError, match="choice 2 is the empty string"):
            llm.generate(["A", "B"], [choice(), bad])
    # The failure was compiled again (not cached); the good spec once.
    assert [s.json_value() for s in GATE.compiles].count(["ok", "", "no"]) == 2
    assert [s.json_value() for s in GATE.compiles].count(["yes", "no"]) == 1
    assert not llm.engine.output_processor.parents  # nothing was added
    assert llm.generate("A", choice(temperature=0))[0].outputs[0].text in CHOICES


def test_grammar_end_under_ignore_eos_stops_the_request(llm):
    out = llm.generate("A", choice(temperature=0, ignore_eos=True, max_tokens=30))[0]
    c = out.outputs[0]
    assert c.text in CHOICES and c.finish_reason == "stop"
    assert c.token_ids[-1] == EOS


def test_abort_of_a_parked_request(llm):
    engine = llm.engine
    GATE.open.clear()
    engine.add_request("parked", "A", choice(["p", "q"]))
    assert engine.structured.parked
    (out,) = engine.abort_request("parked")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.structured.parked and not engine.has_unfinished_requests()


def test_sampler_applies_bitmasks_to_their_rows_only():
    from tessellm.engine.sampler import Sampler, apply_token_bitmask
    from tessellm.interfaces.schedule import ScheduledSeq

    vocab = 70  # three words; the last covers columns 64-95, past the logits' width
    mask = pack([5, 33, 95], 3)  # 95: bit 31 of word 2, the sign bit
    assert mask[2] == -(2**31)
    constrained = ScheduledSeq("c", [1], 0, [0], True, SamplingParams(temperature=0))
    constrained.token_bitmask = mask
    free = ScheduledSeq("f", [1], 0, [0], True, SamplingParams(temperature=0))
    logits = torch.randn(2, vocab)
    logits[:, 60] = 100.0
    logits[:, 33] = 50.0
    masked = apply_token_bitmask(logits, [free, constrained])
    assert torch.equal(masked[0], logits[0])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [5, 33]
    assert apply_token_bitmask(logits[1:], [constrained]).isfinite().sum() == 2  # all rows
    assert Sampler()(logits, [free, constrained])[0] == [60, 33]
    constrained.params = SamplingParams(temperature=1.0, logprobs=1)
    logits[1, 5] = 50.0
    draws = {Sampler(seed)(logits, [free, constrained])[0][1] for seed in range(20)}
    assert draws == {5, 33}
    _, logprobs = Sampler()(logits, [free, constrained])
    # Logprobs are of the raw distribution (vLLM's default), not the masked one.
    assert logprobs is not None and logprobs[1] is not None and logprobs[1][1] >= 2


def test_prepare_structured_raises_before_the_request_is_added(llm):
    import asyncio

    from tessellm.engine.async_engine import AsyncLLMEngine

    async def main() -> None:
        front = AsyncLLMEngine(llm.engine)
        front.start()
        try:
            with pytest.raises(InvalidRequestError, match="empty string"):
                await front.prepare_structured(choice(["a", ""]))
            await front.prepare_structured(choice(["a", "b"]))  # compiled and cached
            await front.prepare_structured(SamplingParams())  # nothing to compile
            assert len(GATE.compiles) == 2
        finally:
            front._stopping = True
            front._wakeup.set()
            await asyncio.to_thread(front._thread.join)

    asyncio.run(main())
