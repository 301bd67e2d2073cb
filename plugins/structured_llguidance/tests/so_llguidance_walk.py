"""Shared by the llguidance backend's tests: the tokenizer, the backend and random walks
through a compiled grammar's bitmasks."""

from __future__ import annotations

import functools
import random

import torch

from tessellm.interfaces.structured_output import BITS_PER_WORD, CompiledGrammar, bitmask_words
from tessellm.sources.random_weights import build_tokenizer
from tessellm_structured_llguidance.backend import LLGuidanceBackend

TOKENIZER_SIZE, VOCAB, EOS = 300, 333, 2
MAX_STEPS = 400
# Tokens that close what is open: weighted up so random walks end in a few dozen steps.
CLOSERS = ('"', "}", "]", ")", ",")


@functools.cache
def byte_tokenizer():
    """A byte-level tokenizer of 300 ids (EOS 2); logits are padded to 333."""
    return build_tokenizer(TOKENIZER_SIZE, 1, [EOS])


@functools.cache
def backend() -> LLGuidanceBackend:
    return LLGuidanceBackend(byte_tokenizer(), VOCAB, [EOS])


def allowed_ids(bitmask: torch.Tensor) -> list[int]:
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(1) >> shifts) & 1).flatten()[:VOCAB]
    return bits.nonzero().flatten().tolist()


def walk(compiled: CompiledGrammar, seed: int, prefix: str = "", tokenizer=None) -> str:
    """Text from random allowed tokens (after ``prefix``'s tokens), ending with EOS as soon
    as it is allowed; asserts every step is consistent and the walk terminates."""
    tokenizer = tokenizer or byte_tokenizer()
    rng = random.Random(seed)
    weights = [8.0 if tokenizer.decode([i]) in CLOSERS else 1.0 for i in range(len(tokenizer))]
    matcher = compiled.new_matcher()
    tokens = list(tokenizer.encode(prefix, add_special_tokens=False))
    for token in tokens:
        assert matcher.accept_token(token), f"prefix token {token} refused"
    mask = torch.zeros(2, bitmask_words(VOCAB), dtype=torch.int32)
    for _ in range(MAX_STEPS):
        matcher.fill_bitmask(mask, 1)
        allowed = allowed_ids(mask[1])
        assert allowed, f"no token allowed after {tokenizer.decode(tokens)!r}"
        assert max(allowed) < len(tokenizer), "a padding id is allowed"
        if EOS in allowed:
            assert matcher.accept_token(EOS) and matcher.is_terminated()
            return tokenizer.decode(tokens)
        token = rng.choices(allowed, [weights[i] for i in allowed])[0]
        assert matcher.accept_token(token), f"allowed token {token} refused"
        tokens.append(token)
    raise AssertionError(f"no end within {MAX_STEPS} steps: {tokenizer.decode(tokens)!r}")
