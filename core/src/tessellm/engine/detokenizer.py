"""Incremental detokenization: text grows token by token, never splitting a character.

Decoding a window of recent tokens and diffing against the same window without the newest
token keeps word-boundary spaces right (SentencePiece/BPE decoders depend on context) and
holds back a byte-fallback sequence until its character is complete. The window starts
with the last few prompt tokens, so the first output token gets its leading space.

Where the HF tokenizer's ``decode`` is exactly its Rust backend's (a fast tokenizer with
no Python-side clean-up), ``tokenizers``' ``DecodeStream`` runs the same window algorithm
in Rust: one call per token instead of two Python ``decode`` calls, about five times
cheaper, which matters at hundreds of sequences per step. Anything else (slow tokenizers,
clean-up of tokenization spaces, a prompt that ends inside a character) takes the window
algorithm in Python, through the tokenizer's own ``decode``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

CONTEXT_TOKENS = 6
# The stream's own copy of the token ids is trimmed once this many have been read past.
_TRIM_AT = 256


def backend_decoder(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` whose ``decode`` equals ``tokenizer.decode`` exactly,
    or None when there is none (slow tokenizer, Python-side clean-up, custom decode)."""
    try:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    except ImportError:
        return None
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    # A subclass that decodes its own way is not its backend.
    if cls.decode is not PreTrainedTokenizerBase.decode:
        return None
    if cls._decode is not PreTrainedTokenizerFast._decode:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return None
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    return backend


class IncrementalDetokenizer:
    """The window algorithm in Python, over any ``decode(ids, skip_special_tokens=...)``."""

    __slots__ = ("_decode_fn", "ids", "prefix_offset", "read_offset", "skip_special", "text")

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int],
        skip_special_tokens: bool = True,
        decode: Callable[..., str] | None = None,
    ) -> None:
        self._decode_fn = decode or tokenizer.decode
        self.skip_special = skip_special_tokens
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly visible text (possibly empty)."""
        self.ids.append(token_id)
        return self._read()

    def _read(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta


class StreamDetokenizer:
    """The window algorithm in Rust (``DecodeStream``), for a tokenizer whose ``decode``
    is its backend's (see ``backend_decoder``)."""

    __slots__ = (
        "_fallback",
        "backend",
        "ids",
        "prefix_offset",
        "read_offset",
        "skip_special",
        "stream",
        "text",
    )

    def __init__(self, backend: Any, context: list[int], skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self.backend = backend
        self.skip_special = skip_special_tokens
        self.stream = DecodeStream(context, skip_special_tokens=skip_special_tokens)
        # The same window bookkeeping as the stream's, kept in case it has to be resumed
        # in Python (``_fallback``) after the stream refuses a token.
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self._fallback: IncrementalDetokenizer | None = None

    def add(self, token_id: int) -> str:
        """Append one token; return the newly visible text (possibly empty)."""
        if self._fallback is not None:
            delta = self._fallback.add(token_id)
        else:
            self.ids.append(token_id)
            try:
                delta = self.stream.step(self.backend, token_id)
            except Exception:
                # The new window's text does not extend the old one's (a decoder that
                # rewrites earlier text): the Python algorithm diffs by length instead.
                delta = self._resume_in_python()
            else:
                if delta is None:
                    return ""
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.ids)
                if self.prefix_offset > _TRIM_AT:
                    del self.ids[: self.prefix_offset]
                    self.read_offset -= self.prefix_offset
                    self.prefix_offset = 0
        self.text += delta
        return delta

    def _resume_in_python(self) -> str:
        window = IncrementalDetokenizer(None, [], self.skip_special, decode=self.backend.decode)
        window.ids = self.ids
        window.prefix_offset = self.prefix_offset
        window.read_offset = self.read_offset
        self._fallback = window
        return window._read()


def make_detokenizer(
    tokenizer: Any,
    prompt_ids: list[int],
    skip_special_tokens: bool = True,
    backend: Any | None = None,
) -> IncrementalDetokenizer | StreamDetokenizer:
    """The cheapest detokenizer that gives ``tokenizer.decode``'s text for this request.
    ``backend`` is ``backend_decoder(tokenizer)``, computed once per tokenizer."""
    if backend is not None:
        context = list(prompt_ids[-CONTEXT_TOKENS:])
        # A prompt that ends inside a character: the stream would start its first text
        # at the prompt's last complete character; the window algorithm does not.
        if not backend.decode(context, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            return StreamDetokenizer(backend, context, skip_special_tokens)
        return IncrementalDetokenizer(
            tokenizer, prompt_ids, skip_special_tokens, decode=backend.decode
        )
    return IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
