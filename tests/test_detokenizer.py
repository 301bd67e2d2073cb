"""The Rust-stream detokenizer gives the same text, delta by delta, as the window algorithm
over HF ``decode``, and its final text is the full decode's continuation of the prompt:
on a byte-level BPE, a SentencePiece-style BPE with byte fallback, and the tests'
word-level tokenizer, for random token sequences (multi-byte characters split across
tokens, byte-fallback tokens, special tokens) with special tokens skipped or kept."""

from __future__ import annotations

import itertools
import random

import pytest
from conftest import make_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tessellm.engine.detokenizer import (
    CONTEXT_TOKENS,
    IncrementalDetokenizer,
    StreamDetokenizer,
    backend_decoder,
    make_detokenizer,
)

CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "héllo wörld, naïve café, déjà vu, straße",
    "日本語のテキストと漢字。中文也可以。",
    "emoji 🎉🚀 and flags 🇫🇷 with text",
    "Привет мир, как дела?",
    "def f(x):\n    return x * 2  # code\n",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def byte_fallback_bpe() -> PreTrainedTokenizerFast:
    """Laid out as Llama 2's tokenizer.json: metaspace, ``<0xNN>`` byte tokens, strip."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyzé,.", "▁h", "▁he", "ll", "llo", "▁w"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("▁h", "e"), ("l", "l"), ("ll", "o"), ("▁", "w")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module", params=["byte_level", "byte_fallback", "word_level"])
def tokenizer(request, tmp_path_factory):
    if request.param == "byte_level":
        return byte_level_bpe()
    if request.param == "byte_fallback":
        return byte_fallback_bpe()
    return make_tokenizer(tmp_path_factory.mktemp("word-level"), 96)


def random_ids(rng: random.Random, tokenizer, length: int) -> list[int]:
    """Random ids, specials among them, or a random corpus line's tokens (valid text)."""
    if rng.random() < 0.5:
        ids = tokenizer.encode(rng.choice(CORPUS), add_special_tokens=False)
        return ids[:length]
    special = tokenizer.all_special_ids
    return [
        rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(tokenizer))
        for _ in range(length)
    ]


def stream_of(tokenizer, prompt: list[int], skip: bool) -> StreamDetokenizer:
    detok = make_detokenizer(tokenizer, prompt, skip, backend_decoder(tokenizer))
    assert isinstance(detok, StreamDetokenizer)
    return detok


def prompt_of(rng: random.Random, tokenizer, skip: bool, specials: bool = False) -> list[int]:
    """A corpus line's tokens whose last few decode to whole characters (a prompt ending
    in a byte that is not a character takes the window algorithm, tested apart)."""
    while True:
        prompt = tokenizer.encode(rng.choice(CORPUS), add_special_tokens=specials)
        context = tokenizer.decode(prompt[-CONTEXT_TOKENS:], skip_special_tokens=skip)
        if not context.endswith("\ufffd"):
            return prompt


def test_fast_tokenizers_take_the_stream(tokenizer):
    assert backend_decoder(tokenizer) is tokenizer.backend_tokenizer


@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_window_algorithm_delta_by_delta(tokenizer, skip):
    rng = random.Random(1)
    for _ in range(60):
        prompt = prompt_of(rng, tokenizer, skip, specials=rng.random() < 0.5)
        outputs = random_ids(rng, tokenizer, rng.randint(1, 40))
        reference = IncrementalDetokenizer(tokenizer, prompt, skip)
        fast = stream_of(tokenizer, prompt, skip)
        for token in outputs:
            assert fast.add(token) == reference.add(token)
        assert fast.text == reference.text


@pytest.mark.parametrize("skip", [True, False])
def test_text_is_the_full_decode_after_the_prompt(tokenizer, skip):
    rng = random.Random(2)
    for _ in range(60):
        prompt = prompt_of(rng, tokenizer, skip)
        outputs = tokenizer.encode(rng.choice(CORPUS), add_special_tokens=False)
        detok = stream_of(tokenizer, prompt, skip)
        for token in outputs:
            detok.add(token)
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=skip)
        full = tokenizer.decode(prompt + outputs, skip_special_tokens=skip)
        assert full.startswith(prompt_text)
        assert detok.text == full[len(prompt_text) :]


def test_multibyte_character_split_over_tokens_is_held_back():
    tokenizer = byte_level_bpe()
    ids = tokenizer.encode(" 🎉!", add_special_tokens=False)
    assert len(ids) >= 4  # the emoji's four bytes are not one token
    detok = stream_of(tokenizer, tokenizer.encode("party"), skip=True)
    deltas = [detok.add(t) for t in ids]
    assert "".join(deltas) == " 🎉!"
    assert all("\ufffd" not in d for d in deltas)
    # Nothing while the emoji is incomplete; then shown whole, once its last byte arrives.
    assert deltas[0] == "" and deltas[-2].endswith("🎉") and deltas[-1] == "!"


def test_byte_fallback_character_is_held_back():
    tokenizer = byte_fallback_bpe()
    ids = tokenizer.encode("日", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["<0xE6>", "<0x97>", "<0xA5>"]
    detok = stream_of(tokenizer, tokenizer.encode("hello"), skip=True)
    deltas = [detok.add(t) for t in ids]
    assert deltas[-1] == "日" and not any(deltas[-3:-1])


def test_special_tokens_skipped_or_kept():
    tokenizer = byte_level_bpe()
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode("hi", add_special_tokens=False)
    kept = stream_of(tokenizer, ids, skip=False)
    skipped = stream_of(tokenizer, ids, skip=True)
    for token in [*ids, eos, *ids]:
        kept.add(token)
        skipped.add(token)
    assert kept.text == "hi</s>hi" and skipped.text == "hihi"


def test_prompt_ending_inside_a_character_takes_the_window_algorithm():
    tokenizer = byte_level_bpe()
    head = tokenizer.encode(" 🎉", add_special_tokens=False)[:-1]
    detok = make_detokenizer(tokenizer, head, True, backend_decoder(tokenizer))
    assert isinstance(detok, IncrementalDetokenizer)
    assert detok.add(tokenizer.encode("x", add_special_tokens=False)[0]).endswith("x")


def test_decoder_that_rewrites_earlier_text_resumes_in_python():
    # Fuse then Replace("ab", "X"): "a" then "b" turns the shown "a" into "X", which the
    # stream refuses; the window algorithm goes on from the same state.
    vocab = {"a": 0, "b": 1, "c": 2, "d": 3, "<unk>": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Fuse(), decoders.Replace("ab", "X")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tokens = [2, 0, 1, 2, 3, 0, 1, 1, 2]
    reference = IncrementalDetokenizer(tokenizer, [3], True)
    fast = stream_of(tokenizer, [3], skip=True)
    assert [fast.add(t) for t in tokens] == [reference.add(t) for t in tokens]
    assert fast._fallback is not None


def test_clean_up_of_tokenization_spaces_keeps_hf_decode(tmp_path):
    tokenizer = make_tokenizer(tmp_path, 64)
    tokenizer.clean_up_tokenization_spaces = True
    assert backend_decoder(tokenizer) is None
    detok = make_detokenizer(tokenizer, [5, 6], True, None)
    assert isinstance(detok, IncrementalDetokenizer)


def test_slow_or_custom_tokenizers_keep_their_decode():
    class Pieces:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("ab"[i] for i in ids)

    assert backend_decoder(Pieces()) is None
    detok = make_detokenizer(Pieces(), [0], True, backend_decoder(Pieces()))
    assert [detok.add(t) for t in [1, 0]] == ["b", "a"]


def test_logprob_pieces_keep_their_word_boundary_space():
    """A SentencePiece token decoded alone loses its "▁" space ("▁w" reads "w"); a
    logprob's token text is read after its predecessor, so the pieces concatenate to the
    text, as OpenAI's logprob tokens do."""
    from tessellm.engine.output_processor import OutputProcessor

    tok = byte_fallback_bpe()
    processor = OutputProcessor(tok)
    ids = tok.encode("hello world", add_special_tokens=False)
    pieces = [
        processor._logprob_entry(token, previous, -0.5, 1, [(token, -0.5)])[token].decoded_token
        for previous, token in itertools.pairwise(ids)
    ]
    assert "".join(pieces) == tok.decode(ids)[len(tok.decode(ids[:1])) :]
    spaced = ids[pieces.index(" w") + 1]
    assert tok.decode([spaced]) == "w"  # alone, the space is gone
    # The first prompt token has no predecessor: decoded alone.
    first = processor._logprob_entry(ids[0], None, -0.5, 1, [(ids[0], -0.5)])
    assert first[ids[0]].decoded_token == tok.decode(ids[:1])
