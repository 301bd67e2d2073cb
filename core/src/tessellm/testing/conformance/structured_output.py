"""``check_structured_output_backend``: a grammar backend's matchers walked through known
valid and invalid outputs, token by token, with a real (byte-level) tokenizer."""

from __future__ import annotations

import json
import threading
from typing import Any

import torch

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
from tessellm.testing.conformance.result import Checker, CheckResult
from tessellm.testing.conformance.structured_batch import check_batched_fill

# GRAMMARS and BAD_GRAMMARS were defined here: still importable from this module.
from tessellm.testing.conformance.structured_cases import BAD_GRAMMARS as BAD_GRAMMARS
from tessellm.testing.conformance.structured_cases import GRAMMARS as GRAMMARS
from tessellm.testing.conformance.structured_cases import Case, cases_for, invalid_specs

# The default tokenizer: every byte a token, filler words up to the size; logits padded
# past it to a width that is not a multiple of 32 (a partly used last bitmask word).
TOKENIZER_SIZE = 300
PADDED_VOCAB = 333
BOS_ID, EOS_ID = 1, 2
# A value no backend writes: fill_bitmask must overwrite all of its row and nothing else.
SENTINEL = 0x5A5A5A5A
ROLLBACK_TOKENS = 3
THREADS = 4


class _Walk:
    """Helpers over one bitmask buffer of three rows; the backend fills the middle one."""

    def __init__(self, checker: Checker, tokenizer: Any, vocab_size: int, eos: int) -> None:
        self.checker, self.tokenizer = checker, tokenizer
        self.vocab_size, self.eos = vocab_size, eos
        self.words = bitmask_words(vocab_size)
        self.mask = torch.full((3, self.words), SENTINEL, dtype=torch.int32)
        self.shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)

    def fill(self, matcher: GrammarMatcher, where: str) -> torch.Tensor | None:
        """The allowed-token flags (bool, ``vocab_size``) after ``fill_bitmask``; None
        (after recording a failure) when the fill raised or broke the buffer."""
        self.mask.fill_(SENTINEL)
        try:
            matcher.fill_bitmask(self.mask, 1)
        except Exception as exc:
            self.checker.crashed(f"{where}: fill_bitmask", exc)
            return None
        others = torch.cat([self.mask[0], self.mask[2]])
        if not self.checker.expect(
            bool((others == SENTINEL).all()), f"{where}: fill_bitmask(mask, 1) wrote other rows"
        ):
            return None
        bits = (self.mask[1].unsqueeze(1) >> self.shifts) & 1
        allowed = bits.flatten()[: self.vocab_size].bool()
        padding = allowed[len(self.tokenizer) :]
        if not self.checker.expect(
            not bool(padding.any()),
            f"{where}: ids past the tokenizer ({len(self.tokenizer)}..{self.vocab_size - 1}) "
            f"are allowed: {(padding.nonzero().flatten() + len(self.tokenizer)).tolist()[:8]}",
        ):
            return None
        return allowed

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def show(self, token: int) -> str:
        return f"{token} ({self.tokenizer.decode([token])!r})"

    def accept_all(self, matcher: GrammarMatcher, tokens: list[int], where: str) -> bool:
        """Each token allowed by the mask, then accepted; False (recorded) at the first miss."""
        for step, token in enumerate(tokens):
            at = f"{where} step {step}"
            allowed = self.fill(matcher, at)
            if allowed is None:
                return False
            problem = None
            if not bool(allowed[token]):
                problem = f"token {self.show(token)} of a valid output is not allowed"
            elif not matcher.accept_token(token):
                problem = f"accept_token({self.show(token)}) returned False"
            elif matcher.is_terminated():
                problem = "is_terminated() before an end token"
            if problem is not None:
                self.checker.fail(f"{at}: {problem}")
                return False
        return True


def _check_valid(walk: _Walk, compiled: CompiledGrammar, case: Case, text: str) -> None:
    where = f"[{case.label}] {text!r}"
    matcher = compiled.new_matcher()
    if not walk.accept_all(matcher, walk.encode(text), where):
        return
    allowed = walk.fill(matcher, f"{where} at the end")
    if allowed is None:
        return
    checker = walk.checker
    if not checker.expect(bool(allowed[walk.eos]), f"{where}: end token not allowed at the end"):
        return
    checker.expect(matcher.accept_token(walk.eos), f"{where}: accept_token(eos) returned False")
    checker.expect(matcher.is_terminated(), f"{where}: not terminated after the end token")
    checker.expect(
        not matcher.accept_token(walk.encode(text[:1] or "a")[0]),
        f"{where}: a token after termination was accepted",
    )


def _check_start_and_bad(walk: _Walk, compiled: CompiledGrammar, case: Case) -> None:
    where, checker = f"[{case.label}]", walk.checker
    matcher = compiled.new_matcher()
    start = walk.fill(matcher, f"{where} at the start")
    if start is None:
        return
    checker.expect(
        bool(start[walk.eos]) == case.empty_ok,
        f"{where}: end token {'not ' if case.empty_ok else ''}allowed at the start "
        f"(the empty output is {'' if case.empty_ok else 'not '}valid)",
    )
    if not walk.accept_all(matcher, walk.encode(case.bad_prefix), f"{where} prefix"):
        return
    before = walk.fill(matcher, f"{where} after {case.bad_prefix!r}")
    if before is None:
        return
    bad = walk.encode(case.bad_next)[0]
    at = f"{where} after {case.bad_prefix!r}"
    checker.expect(not bool(before[bad]), f"{at}: token {walk.show(bad)} is allowed")
    checker.expect(
        not matcher.accept_token(bad), f"{at}: accept_token({walk.show(bad)}) returned True"
    )
    after = walk.fill(matcher, f"{at}, a refused token later")
    if after is not None:
        checker.expect(bool((after == before).all()), f"{at}: a refused token changed the state")
    # A matcher of the same grammar made now starts afresh: matchers share no state.
    fresh = walk.fill(compiled.new_matcher(), f"{where} new matcher")
    if fresh is not None:
        checker.expect(
            bool((fresh == start).all()),
            f"{where}: a new matcher made after another advanced starts elsewhere",
        )


def _check_rollback(walk: _Walk, compiled: CompiledGrammar, case: Case) -> None:
    text = max(case.valid, key=len)
    tokens = walk.encode(text)
    where = f"[{case.label}] rollback"
    half = max(0, len(tokens) - ROLLBACK_TOKENS) // 2
    n = min(ROLLBACK_TOKENS, len(tokens) - half)
    matcher = compiled.new_matcher()
    if not walk.accept_all(matcher, tokens[:half], where):
        return
    before = walk.fill(matcher, where)
    if before is None or not walk.accept_all(matcher, tokens[half : half + n], where):
        return
    try:
        matcher.rollback(n)
    except Exception as exc:
        walk.checker.crashed(f"{where}: rollback({n})", exc)
        return
    after = walk.fill(matcher, f"{where} after rollback({n})")
    if after is None:
        return
    if not walk.checker.expect(
        bool((after == before).all()),
        f"{where}: the mask after accepting {n} tokens and rollback({n}) differs from before",
    ):
        return
    # The rolled-back matcher goes on to accept the whole output and end.
    if walk.accept_all(matcher, tokens[half:], f"{where}, then the rest"):
        ok = matcher.accept_token(walk.eos) and matcher.is_terminated()
        walk.checker.expect(ok, f"{where}: the rest accepted but the end token not")


def _check_invalid(checker: Checker, backend: StructuredOutputBackend, spec: GrammarSpec) -> None:
    where = f"[{spec.kind}] invalid {spec.value!r}"
    try:
        backend.compile(spec)
    except ValueError as exc:
        checker.expect(bool(str(exc).strip()), f"{where}: ValueError without a message")
        return
    except Exception as exc:
        checker.fail(f"{where}: raised {type(exc).__name__} ({exc}), not ValueError")
        return
    checker.fail(f"{where}: compiled without error")


def _check_threads(walk: _Walk, backend: StructuredOutputBackend) -> None:
    """One new spec compiled from several threads at once; each result works."""
    schema = {"type": "object", "properties": {"q": {"type": "integer"}}, "required": ["q"]}
    spec = GrammarSpec("json", json.dumps(schema))
    barrier = threading.Barrier(THREADS)
    results: list[Any] = [None] * THREADS

    def compile_one(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = backend.compile(spec)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=compile_one, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for i, result in enumerate(results):
        where = f"[threads] compile in thread {i}"
        if isinstance(result, Exception):
            walk.checker.crashed(where, result)
        elif not isinstance(result, CompiledGrammar):
            walk.checker.fail(f"{where} returned {result!r}, not a CompiledGrammar")
        else:
            walk.accept_all(result.new_matcher(), walk.encode('{"q": 12}'), where)


def _backend_class(checker: Checker, name_or_class: str | type) -> type | None:
    if not isinstance(name_or_class, str):
        cls = name_or_class
    else:
        from tessellm.plugins import get_plugins

        try:
            cls = get_plugins().load("structured_output_backends", name_or_class)
        except Exception as exc:
            checker.crashed("loading the backend", exc)
            return None
    if not (isinstance(cls, type) and issubclass(cls, StructuredOutputBackend)):
        checker.fail(f"registered target {cls!r} is not a StructuredOutputBackend subclass")
        return None
    caps = getattr(cls, "capabilities", None)
    if not checker.expect(
        isinstance(caps, StructuredOutputCapabilities),
        f"capabilities is {caps!r}, not a StructuredOutputCapabilities",
    ):
        return None
    unknown = [k for k in caps.kinds if k not in GRAMMAR_KINDS]
    checker.expect(not unknown, f"capabilities.kinds has unknown kinds {unknown}")
    checker.expect(
        "grammar" not in caps.kinds or bool(caps.grammar_syntax),
        "capabilities.kinds has 'grammar' but grammar_syntax is empty",
    )
    if isinstance(name_or_class, str):
        checker.expect(
            cls.name == name_or_class,
            f"name is {cls.name!r} but the backend is registered as {name_or_class!r}",
        )
    return cls


def check_structured_output_backend(
    name_or_class: str | type[StructuredOutputBackend],
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> CheckResult:
    """Check the structured-output backend registered as ``name_or_class`` (or that class).

    The backend is built for ``tokenizer`` (default: a byte-level tokenizer of 300 ids) and
    logits of ``vocab_size`` (default: 333 for the default tokenizer, else the tokenizer's
    size), ending with the tokenizer's EOS. For each kind in ``capabilities.kinds`` (the
    ``grammar`` kind when ``grammar_syntax`` is ``"ebnf"`` or ``"lark"``), a spec compiles
    and its matchers are walked through the exact tokenization of outputs in the language:
    at every step ``fill_bitmask`` (into the middle row of three, overwriting its row
    and nothing else) allows the next token and ``accept_token`` takes it; at the end the
    EOS is allowed and accepting it terminates the matcher. A text that breaks the
    language is refused by the mask and by ``accept_token`` (state unchanged); ids past
    the tokenizer are never allowed; ``rollback`` restores the earlier mask;
    ``fill_bitmasks`` (the class's batched fill) gives each matcher's own rows; the empty
    output is refused where it is not valid; invalid specs raise ``ValueError``; one spec
    compiled from four threads at once works."""
    label = name_or_class if isinstance(name_or_class, str) else name_or_class.__name__
    checker = Checker(label, "structured_output_backend")
    cls = _backend_class(checker, name_or_class)
    if cls is None:
        return checker.finish()
    try:
        if tokenizer is None:
            from tessellm.sources.random_weights import build_tokenizer

            tokenizer = build_tokenizer(TOKENIZER_SIZE, BOS_ID, [EOS_ID])
            vocab_size = vocab_size or PADDED_VOCAB
        vocab_size = vocab_size or len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            return checker.skip("the tokenizer has no EOS token")
        backend = cls(tokenizer, vocab_size, [eos])
    except Exception as exc:
        checker.crashed("building the backend", exc)
        return checker.finish()
    walk = _Walk(checker, tokenizer, vocab_size, eos)
    syntax = cls.capabilities.grammar_syntax
    for kind in cls.capabilities.kinds:
        cases = cases_for(kind, syntax)
        for case in cases:
            try:
                compiled = backend.compile(case.spec)
            except Exception as exc:
                checker.crashed(f"[{case.label}] compile", exc)
                continue
            if not isinstance(compiled, CompiledGrammar):
                checker.fail(f"[{case.label}] compile returned {compiled!r}")
                continue
            try:
                for text in case.valid:
                    _check_valid(walk, compiled, case, text)
                _check_start_and_bad(walk, compiled, case)
                _check_rollback(walk, compiled, case)
                text = max(case.valid, key=len)
                check_batched_fill(
                    checker, compiled, walk.encode(text), eos, walk.words, case.label
                )
            except Exception as exc:
                checker.crashed(f"[{case.label}]", exc)
            checker.result.checked.append(case.label)
        for spec in invalid_specs(kind, syntax):
            _check_invalid(checker, backend, spec)
            checker.result.checked.append(f"invalid {spec.kind}")
        if not cases:
            checker.result.checked.append(f"{kind}: no test case for syntax {syntax!r}")
    if "json" in cls.capabilities.kinds:
        try:
            _check_threads(walk, backend)
        except Exception as exc:
            checker.crashed("[threads]", exc)
        checker.result.checked.append("compile from threads")
    return checker.finish()
