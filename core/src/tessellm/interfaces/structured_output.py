"""The structured-output seam: grammar backends that constrain sampling to a language.

A backend (``register_structured_output_backends``; ``xgrammar`` and ``llguidance`` are
first-party plugins) compiles a :class:`GrammarSpec` (a JSON schema, a regex, a choice of
strings, a grammar in the backend's syntax, any JSON object, or a structural tag) into a
:class:`CompiledGrammar` for one tokenizer. Compiling is slow (milliseconds to seconds) and
runs off the engine's step loop, in a worker pool, cached by the spec; a compiled grammar
is shared by every request that uses the same spec. Each request (each of ``n`` samples)
gets its own :class:`GrammarMatcher`: the parser state after the tokens it has produced.

Before a step samples a constrained request the engine asks its matcher to
``fill_bitmask``: one ``int32`` row of ``ceil(vocab_size / 32)`` words where bit ``j`` of
word ``i`` (``(row[i] >> j) & 1``) says token ``32 * i + j`` may come next (the layout
xgrammar and llguidance share). The sampler sets the logits of forbidden tokens to
``-inf`` on the device. After the step the engine feeds the sampled token to
``accept_token``. Token ids at or above the tokenizer's size (padding of the model's
vocabulary) are never allowed. When the grammar is complete, only the end-of-sequence
tokens are allowed, so a request finishes with ``finish_reason="stop"``; one cut by
``max_tokens`` first finishes with ``"length"``, its text incomplete.

Errors: ``compile`` raises ``ValueError`` naming the problem for a spec that is not valid
(a schema that is not a schema, a regex that does not parse); the server answers it with
a 400. A backend that cannot compile a kind at all leaves it out of ``capabilities.kinds``.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
GRAMMAR_KINDS: tuple[GrammarKind, ...] = (
    "json",
    "json_object",
    "regex",
    "choice",
    "grammar",
    "structural_tag",
)
BITS_PER_WORD = 32


def bitmask_words(vocab_size: int) -> int:
    """Words of one bitmask row for a vocabulary of ``vocab_size`` logits."""
    return -(-vocab_size // BITS_PER_WORD)


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """What to constrain to, in a canonical, hashable form.

    ``value`` by kind: ``json``: the schema as JSON text; ``json_object``: ``""`` (any
    JSON object); ``regex``: the pattern; ``choice``: a JSON list of the allowed strings;
    ``grammar``: the grammar text in the backend's syntax (GBNF/EBNF for xgrammar, Lark
    for llguidance); ``structural_tag``: JSON text of vLLM's structural-tag object
    (``{"structures": [{"begin", "schema", "end"}], "triggers": [...]}``): free text until
    a trigger, then the matching structure's schema between ``begin`` and ``end``.
    ``any_whitespace=False`` asks JSON kinds for compact output (vLLM's
    ``disable_any_whitespace``).
    """

    kind: GrammarKind
    value: str
    any_whitespace: bool = True

    @property
    def key(self) -> str:
        """A stable digest of the spec: the compile cache's key."""
        text = f"{self.kind}\0{int(self.any_whitespace)}\0{self.value}"
        return hashlib.sha256(text.encode()).hexdigest()

    def json_value(self) -> Any:
        """The parsed value of the JSON-valued kinds (``json``, ``choice``,
        ``structural_tag``)."""
        return json.loads(self.value)


@dataclass(frozen=True, slots=True)
class StructuredOutputCapabilities:
    """What a backend compiles (data, read by selection and ``tessellm plugins``)."""

    kinds: tuple[GrammarKind, ...] = GRAMMAR_KINDS
    grammar_syntax: str = ""  # the ``grammar`` kind's language, e.g. "ebnf" or "lark"


class GrammarMatcher(ABC):
    """One sequence's position in a compiled grammar (not thread-safe; one per sample)."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by ``token_id``; ``False`` (state unchanged) if the grammar forbids it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (``int32``, CPU, shape
        ``[rows, bitmask_words(vocab_size)]``; see the module docstring for the layout)."""

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask[i]`` for each ``matchers[i]`` (all of this class): a step's
        constrained rows at once, so a backend may spread them over threads (plugin API
        1.3). The default fills one row after another."""
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculation, dropped steps)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and an end-of-sequence token has been accepted."""


class CompiledGrammar(ABC):
    """A spec compiled for one tokenizer: immutable, shared across requests and threads."""

    @abstractmethod
    def new_matcher(self) -> GrammarMatcher:
        """A matcher at the grammar's start."""


class StructuredOutputBackend(ABC):
    """Compiles grammar specs for one tokenizer (one instance per engine).

    ``tokenizer`` is the engine's Hugging Face tokenizer, ``vocab_size`` the width of the
    model's logits (at least the tokenizer's size: bitmask rows cover it), and
    ``eos_token_ids`` the tokens that end a sequence (allowed once the grammar is
    complete). ``compile`` may be called from several threads at once.
    """

    name: ClassVar[str] = ""
    capabilities: ClassVar[StructuredOutputCapabilities] = StructuredOutputCapabilities()

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile ``spec``; ``ValueError`` naming the problem if it is not valid."""
