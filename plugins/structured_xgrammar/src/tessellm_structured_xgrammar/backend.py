"""The ``xgrammar`` structured-output backend: every :class:`GrammarSpec` kind compiled by
xgrammar (https://github.com/mlc-ai/xgrammar) for one tokenizer.

``grammar`` specs are EBNF in xgrammar's GBNF dialect (root rule ``root``); a grammar with
no ``::=`` whose first rule is ``start:`` is read as Lark, as vLLM accepts both.
``structural_tag`` takes vLLM's shape (``structures`` + ``triggers``) or xgrammar's own
(``{"type": "structural_tag", "format": {...}}``), passed through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from tessellm.interfaces.structured_output import (
    BITS_PER_WORD,
    GRAMMAR_KINDS,
    CompiledGrammar,
    GrammarMatcher,
    GrammarSpec,
    StructuredOutputBackend,
    StructuredOutputCapabilities,
    bitmask_words,
)
from tessellm_structured_xgrammar.json_strings import fixed_ebnf, mentions_length

logger = logging.getLogger(__name__)

# xgrammar's compiled-grammar cache is unbounded by default; a server that sees a new
# schema per request would grow without limit. The engine keeps its own cache by spec.
COMPILER_CACHE_BYTES = 256 * 1024 * 1024
COMPILER_MAX_THREADS = 8

WHAT = {
    "json": "JSON schema",
    "json_object": "json_object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "structural_tag": "structural tag",
}
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: " and assertion noise.
_LOG_PREFIX = re.compile(r"^\s*\[[^\]]*\]\s*\S+:\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: .*? is false:\s*")
_LARK_START = re.compile(r"^\s*\??start\s*:", re.MULTILINE)


def _problem(exc: BaseException) -> str:
    """xgrammar's message without its log prefix, on one line."""
    text = _CHECK_FAILED.sub("", _LOG_PREFIX.sub("", str(exc))).strip()
    return " ".join(text.split()) or type(exc).__name__


def _ebnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal: quote, backslash and control characters escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        out.append(f"\\u{code:04x}" if ch in '"\\' or code < 0x20 or code == 0x7F else ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: Any) -> str:
    """An EBNF grammar matching exactly one of ``choices`` (a list of strings)."""
    if not isinstance(choices, list) or not choices:
        raise ValueError("choice must be a non-empty list of strings")
    if not all(isinstance(c, str) for c in choices):
        raise ValueError("choice must list strings only")
    unique = list(dict.fromkeys(choices))
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in unique)


def structural_tag_json(value: Any) -> str:
    """xgrammar's structural-tag JSON for vLLM's ``{"structures", "triggers"}`` shape (or
    xgrammar's own ``{"format": ...}`` unchanged)."""
    if not isinstance(value, dict):
        raise ValueError("structural_tag must be a JSON object")
    if "structures" not in value:
        if "format" in value:
            return json.dumps({"type": "structural_tag", "format": value["format"]})
        raise ValueError("structural_tag needs 'structures' and 'triggers' (or a 'format')")
    structures, triggers = value["structures"], value.get("triggers")
    if not isinstance(structures, list):
        raise ValueError("structural_tag.structures must be a list")
    if not isinstance(triggers, list) or not triggers:
        raise ValueError("structural_tag.triggers must be a non-empty list of strings")
    if not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag.triggers must be non-empty strings")
    tags = []
    for i, item in enumerate(structures):
        where = f"structural_tag.structures[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be an object with begin, schema and end")
        begin, end, schema = item.get("begin"), item.get("end"), item.get("schema", True)
        if not isinstance(begin, str) or not isinstance(end, str):
            raise ValueError(f"{where}: begin and end must be strings")
        if not isinstance(schema, dict | bool):
            raise ValueError(f"{where}.schema must be a JSON schema object")
        content = {"type": "json_schema", "json_schema": schema}
        tags.append({"type": "tag", "begin": begin, "content": content, "end": end})
    fmt = {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return json.dumps({"type": "structural_tag", "format": fmt})


class XgrammarMatcher(GrammarMatcher):
    """One sequence's xgrammar matcher (rollback is unbounded in xgrammar >= 0.2).

    Whether it has terminated is kept here: the engine asks after every token and before
    every fill, and at 64 rows a step those calls into xgrammar cost more than the fill's
    own Python. An xgrammar matcher (built without ``terminate_without_stop_token``)
    terminates only by accepting a stop token, so only then is xgrammar asked."""

    __slots__ = ("_matcher", "_stop_ids", "_stop_row", "_terminated")

    def __init__(
        self, compiled: xgr.CompiledGrammar, stop_row: torch.Tensor, stop_ids: frozenset[int]
    ) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._stop_row = stop_row
        self._stop_ids = stop_ids
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        # xgrammar logs a warning for every token offered after termination.
        if self._terminated or not self._matcher.accept_token(token_id):
            return False
        if token_id in self._stop_ids:
            self._terminated = self._matcher.is_terminated()
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self._terminated:
            # xgrammar raises here; a step scheduled past the end samples an end token again.
            bitmask[row].copy_(self._stop_row)
            return
        try:
            self._matcher.fill_next_token_bitmask(bitmask, row)
        except RuntimeError:
            if not self._matcher.is_terminated():
                raise
            self._terminated = True  # ended without a stop token after all
            bitmask[row].copy_(self._stop_row)

    @classmethod
    def fill_bitmasks(cls, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor) -> None:
        """One call into xgrammar for the step's rows, in this thread (``_batch``): the
        Python of 64 separate fills is a third of their cost. A raise leaves the engine to
        fill the rows one at a time."""
        if len(matchers) == 1:  # the batch call's own overhead is not worth it for one
            matchers[0].fill_bitmask(bitmask, 0)
            return
        live = [m for m in matchers if not m._terminated]  # type: ignore[attr-defined]
        if len(live) == len(matchers):
            _batch().batch_fill_next_token_bitmask([m._matcher for m in live], bitmask)
            return
        indices = []
        for row, matcher in enumerate(matchers):
            if matcher._terminated:  # type: ignore[attr-defined]
                bitmask[row].copy_(matcher._stop_row)  # type: ignore[attr-defined]
            else:
                indices.append(row)
        if live:
            _batch().batch_fill_next_token_bitmask([m._matcher for m in live], bitmask, indices)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        try:
            self._matcher.rollback(num_tokens)
        except RuntimeError as exc:
            raise ValueError(f"cannot roll back {num_tokens} token(s): {_problem(exc)}") from None
        finally:
            self._terminated = self._matcher.is_terminated()

    def is_terminated(self) -> bool:
        return self._terminated


_PER_THREAD = threading.local()


def _batch() -> xgr.BatchGrammarMatcher:
    """This thread's batch matcher of one thread: it fills in the caller's thread (its
    thread pool was slower at 64 rows on an H100 host, 4.91 vs 3.25 ms/step in f90bdf5,
    where the engine's other threads want the cores too). One per thread, as engines in
    one process may step in threads of their own."""
    batch = getattr(_PER_THREAD, "batch", None)
    if batch is None:
        batch = _PER_THREAD.batch = xgr.BatchGrammarMatcher(max_threads=1)
    return batch


class XgrammarGrammar(CompiledGrammar):
    """An xgrammar ``CompiledGrammar`` (immutable; matchers share it across threads)."""

    __slots__ = ("_stop_ids", "_stop_row", "compiled")

    def __init__(
        self, compiled: xgr.CompiledGrammar, stop_row: torch.Tensor, stop_ids: frozenset[int]
    ) -> None:
        self.compiled = compiled
        self._stop_row = stop_row
        self._stop_ids = stop_ids

    def new_matcher(self) -> XgrammarMatcher:
        return XgrammarMatcher(self.compiled, self._stop_row, self._stop_ids)


class XgrammarBackend(StructuredOutputBackend):
    """Compiles specs with one ``xgrammar.GrammarCompiler``, which is thread-safe: the
    engine's compile pool shares it."""

    name = "xgrammar"
    capabilities = StructuredOutputCapabilities(kinds=GRAMMAR_KINDS, grammar_syntax="ebnf")

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        # Ids past the tokenizer (padding of the logits) become special tokens: never allowed.
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(self.eos_token_ids) or None
        )
        self._compiler = xgr.GrammarCompiler(
            self.tokenizer_info,
            max_threads=max(1, min(COMPILER_MAX_THREADS, os.cpu_count() or 1)),
            cache_limit_bytes=COMPILER_CACHE_BYTES,
        )
        words = [0] * bitmask_words(vocab_size)
        for token in self.tokenizer_info.stop_token_ids:
            if 0 <= token < vocab_size:
                words[token // BITS_PER_WORD] |= 1 << (token % BITS_PER_WORD)
        # int32 words: bit 31 is the sign bit.
        signed = [w - (1 << 32) if w >= 1 << 31 else w for w in words]
        self._stop_row = torch.tensor(signed, dtype=torch.int32)
        self._stop_ids = frozenset(self.tokenizer_info.stop_token_ids)

    def compile(self, spec: GrammarSpec) -> XgrammarGrammar:
        if spec.kind not in WHAT:
            raise ValueError(f"xgrammar cannot compile a {spec.kind!r} spec")
        try:
            compiled = self._compile(spec)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid {WHAT[spec.kind]}: {_problem(exc)}") from None
        return XgrammarGrammar(compiled, self._stop_row, self._stop_ids)

    def _compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        compiler = self._compiler
        # xgrammar's default without any_whitespace is ", " and ": "; compact means none.
        separators = None if spec.any_whitespace else (",", ":")
        if spec.kind == "json":
            if mentions_length(spec.value):
                grammar = xgr.Grammar.from_json_schema(
                    spec.value, any_whitespace=spec.any_whitespace, separators=separators
                )
                return self._compile_fixed(grammar, spec)
            return compiler.compile_json_schema(
                spec.value, any_whitespace=spec.any_whitespace, separators=separators
            )
        if spec.kind == "json_object":
            # Not the builtin JSON grammar: that one also takes a top-level array.
            return compiler.compile_json_schema(
                '{"type": "object"}',
                any_whitespace=spec.any_whitespace,
                separators=separators,
                strict_mode=False,
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_grammar(json.loads(spec.value)))
        if spec.kind == "grammar":
            if "::=" not in spec.value and _LARK_START.search(spec.value):
                return compiler.compile_lark(spec.value)
            return compiler.compile_grammar(spec.value)
        tag = structural_tag_json(spec.json_value())
        if mentions_length(tag):
            return self._compile_fixed(xgr.Grammar.from_structural_tag(tag), spec)
        return compiler.compile_structural_tag(tag)

    def _compile_fixed(self, grammar: xgr.Grammar, spec: GrammarSpec) -> xgr.CompiledGrammar:
        """``grammar`` with length-bounded strings that stay valid JSON (json_strings.py)."""
        ebnf = fixed_ebnf(grammar)
        if ebnf is not None:
            try:
                return self._compiler.compile_grammar(ebnf)
            except RuntimeError as exc:  # the printed grammar did not parse back
                logger.warning("xgrammar: bounded-string fix not applied to %s: %s", spec.key, exc)
        return self._compiler.compile_grammar(grammar)
