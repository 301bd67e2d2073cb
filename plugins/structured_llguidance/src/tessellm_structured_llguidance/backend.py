"""The ``llguidance`` structured-output backend.

One ``LLTokenizer`` per backend (building it walks the whole vocabulary, ~1 s for a real
tokenizer); each compiled grammar keeps one ``LLMatcher`` at its start and gives every
request a ``deep_copy`` of it, which shares the compiled lexer and grammar.

llguidance's matcher enters a permanent error state when fed a token its grammar forbids,
so ``accept_token`` checks a token with ``validate_tokens`` before consuming it. The
end-of-sequence token is kept out of llguidance altogether: a matcher that has already
stopped (nothing can follow) consumes EOS without recording it, so rolling it back would
undo the token before it. The matcher here records termination itself instead.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer

from tessellm.interfaces.structured_output import (
    GRAMMAR_KINDS,
    CompiledGrammar,
    GrammarMatcher,
    GrammarSpec,
    StructuredOutputBackend,
    StructuredOutputCapabilities,
    bitmask_words,
)
from tessellm_structured_llguidance.grammars import grammar_for

_KIND_NAMES = {
    "json": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "Lark grammar",
    "structural_tag": "structural_tag",
}


class LLGuidanceBackend(StructuredOutputBackend):
    """Compiles every grammar kind with llguidance; ``grammar`` is llguidance's Lark
    dialect (GBNF is converted to it)."""

    name = "llguidance"
    capabilities = StructuredOutputCapabilities(kinds=GRAMMAR_KINDS, grammar_syntax="lark")

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        if not self.eos_token_ids:
            raise ValueError("the llguidance backend needs at least one end-of-sequence token")
        if not all(0 <= t < vocab_size for t in self.eos_token_ids):
            raise ValueError(f"end-of-sequence ids {self.eos_token_ids} exceed the vocabulary")
        self._lltokenizer = _build_lltokenizer(tokenizer, vocab_size, self.eos_token_ids)
        self._special_tokens = _special_tokens(
            tokenizer, self._lltokenizer, vocab_size, self.eos_token_ids
        )

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        grammar = grammar_for(spec, self._special_tokens)
        # Constructing the matcher compiles the grammar (dropping the GIL); an invalid one
        # leaves it in an error state with llguidance's message rather than raising.
        matcher = LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {_KIND_NAMES[spec.kind]}: {matcher.get_error().strip()}")
        return LLGuidanceGrammar(matcher, self.vocab_size, self.eos_token_ids)


class LLGuidanceGrammar(CompiledGrammar):
    """A compiled grammar: a matcher at the start, copied for each request."""

    def __init__(self, start: LLMatcher, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._start = start
        self._vocab_size = vocab_size
        self._eos_token_ids = frozenset(eos_token_ids)
        # The row a terminated matcher writes: only EOS, as llguidance does once stopped.
        words = [0] * bitmask_words(vocab_size)
        for token in self._eos_token_ids:
            words[token // 32] |= 1 << (token % 32)
        # int32 words: bit 31 is the sign bit.
        self._eos_row = torch.tensor(
            [w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32
        )

    def new_matcher(self) -> GrammarMatcher:
        return LLGuidanceMatcher(
            self._start.deep_copy(), self._vocab_size, self._eos_token_ids, self._eos_row
        )


class LLGuidanceMatcher(GrammarMatcher):
    """One sequence's state in an llguidance grammar."""

    __slots__ = (
        "_buffer",
        "_buffer_address",
        "_buffer_rows",
        "_buffer_stride",
        "_consumed",
        "_eos",
        "_eos_row",
        "_matcher",
        "_row_bytes",
        "_terminated",
        "_vocab_size",
    )

    def __init__(
        self,
        matcher: LLMatcher,
        vocab_size: int,
        eos_token_ids: frozenset[int],
        eos_row: torch.Tensor,
    ) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._eos_row = eos_row
        self._row_bytes = bitmask_words(vocab_size) * 4
        self._consumed = 0  # tokens llguidance holds: a rollback past them would wedge it
        self._terminated = False
        self._buffer: torch.Tensor | None = None  # the bitmask last filled, layout checked
        self._buffer_address = self._buffer_rows = self._buffer_stride = 0

    def accept_token(self, token_id: int) -> bool:
        if self._terminated or not 0 <= token_id < self._vocab_size:
            return False
        m = self._matcher
        if token_id in self._eos:
            # EOS ends a complete grammar; a matcher in error (a resource limit hit
            # mid-grammar) allows only EOS, so the request can still finish.
            if not (m.is_accepting() or m.is_error()):
                return False
            self._terminated = True
            return True
        if m.validate_tokens([token_id]) != 1 or not m.consume_token(token_id):
            return False
        self._consumed += 1
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        # Runs every step for every constrained sequence, so it makes no tensor (llguidance
        # writes the row through its address) and checks the buffer's layout only when it
        # is a new one: the engine reuses one buffer step after step.
        address = bitmask.data_ptr()
        if bitmask is not self._buffer or address != self._buffer_address:
            self._adopt_buffer(bitmask)
        if not 0 <= row < self._buffer_rows:
            raise ValueError(f"bitmask row {row} is out of range ({self._buffer_rows} rows)")
        if self._terminated:
            bitmask[row].copy_(self._eos_row)
            return
        self._matcher.unsafe_compute_mask_ptr(address + row * self._buffer_stride, self._row_bytes)

    def _adopt_buffer(self, bitmask: torch.Tensor) -> None:
        if (
            bitmask.dtype != torch.int32
            or not bitmask.is_cpu
            or bitmask.dim() != 2
            or bitmask.stride(1) != 1
        ):
            raise ValueError("the bitmask must be a 2-D int32 CPU tensor with contiguous rows")
        if bitmask.size(1) * 4 != self._row_bytes:
            raise ValueError(
                f"bitmask rows of {bitmask.size(1)} words do not fit a vocabulary of "
                f"{self._vocab_size} ({self._row_bytes // 4} words)"
            )
        self._buffer = bitmask
        self._buffer_address = bitmask.data_ptr()
        self._buffer_rows = bitmask.size(0)
        self._buffer_stride = bitmask.stride(0) * 4  # bytes

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        if self._terminated:
            self._terminated = False
            num_tokens -= 1
        if num_tokens > self._consumed:
            raise ValueError(
                f"cannot roll back {num_tokens} tokens: only {self._consumed} were accepted"
            )
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self._consumed -= num_tokens

    def is_terminated(self) -> bool:
        return self._terminated


def _build_lltokenizer(
    tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]
) -> LLTokenizer:
    """llguidance's tokenizer from a fast Hugging Face tokenizer (what
    ``llguidance.hf.from_tokenizer`` does, without its class check, which transformers 5's
    ``TokenizersBackend`` may not pass)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"the llguidance backend needs a fast (Rust) tokenizer, not {type(tokenizer).__name__}"
        )
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the model's {vocab_size} logits"
        )
    backend = copy.copy(backend)  # serialize without the caller's padding/truncation
    backend.no_padding()
    backend.no_truncation()
    # n_vocab is the logits width: ids past the tokenizer have no bytes, so llguidance
    # never allows them.
    return LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))


def _special_tokens(
    tokenizer: Any, lltokenizer: LLTokenizer, vocab_size: int, eos_token_ids: Sequence[int]
) -> dict[str, int]:
    """Text -> id of the added tokens llguidance treats as special (not text), EOS aside:
    EOS ends the sequence, never part of a structure."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    eos = set(eos_token_ids)
    special: dict[str, int] = {}
    for token_id, token in added.items():
        text = str(getattr(token, "content", token))
        if (
            text
            and token_id < vocab_size
            and token_id not in eos
            and lltokenizer.is_special_token(token_id)
        ):
            special[text] = token_id
    return special
