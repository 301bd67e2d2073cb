"""Turns sampled tokens into text, applies stop strings, and builds RequestOutputs.

A parent request with ``n > 1`` fans out into ``n`` child requests ``{id}#{i}``; the
scheduler lets them share the prompt's KV blocks through the prefix cache, and their
completions are gathered here into one RequestOutput.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tessellm.engine.detokenizer import (
    IncrementalDetokenizer,
    StreamDetokenizer,
    backend_decoder,
    make_detokenizer,
)
from tessellm.interfaces.request import Request, RequestStatus
from tessellm.interfaces.schedule import TokenLogprobs
from tessellm.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass(slots=True)
class ChildState:
    index: int
    detok: IncrementalDetokenizer | StreamDetokenizer
    completion: CompletionOutput
    stop_strings: list[str]
    include_stop: bool
    min_tokens: int = 0


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, ChildState] = field(default_factory=dict)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    # Aligned with the prompt; the first token has nothing to be predicted from (None).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.completion.finish_reason is not None for c in self.children.values())


def child_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Found once: whether the Rust decode stream gives this tokenizer's text.
        self._backend = backend_decoder(tokenizer)
        self._alone: dict[int, str] = {}  # token id -> its text decoded alone
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}
        # Child request id -> what its output processing raised (``take_failed``).
        self._failed: dict[str, Exception] = {}

    def add(self, parent_id: str, prompt: str | None, children: list[Request]) -> None:
        state = ParentState(parent_id, prompt, children[0].prompt_token_ids)
        if children[0].params.prompt_logprobs is not None:
            state.prompt_logprobs = [None] * len(state.prompt_token_ids)
        for index, req in enumerate(children):
            params = req.params
            detok = make_detokenizer(
                self.tokenizer, req.prompt_token_ids, params.skip_special_tokens, self._backend
            )
            completion = CompletionOutput(
                index,
                "",
                [],
                0.0 if params.logprobs is not None else None,
                [] if params.logprobs is not None else None,
            )
            state.children[req.request_id] = ChildState(
                index,
                detok,
                completion,
                params.stop_strings,
                params.include_stop_str_in_output,
                params.min_tokens,
            )
            self.child_to_parent[req.request_id] = parent_id
        self.parents[parent_id] = state

    def child_ids(self, parent_id: str) -> list[str]:
        state = self.parents.get(parent_id)
        return list(state.children) if state else []

    def process(
        self,
        changed: list[Request],
        logprobs: dict[str, TokenLogprobs | list[TokenLogprobs] | None],
        prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] | None = None,
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns outputs of parents that changed and child ids stopped by a stop string.

        A request whose processing raises (detokenizing its token, its logprobs' text) is
        left out of both: ``take_failed`` hands it to the engine, which fails it alone."""
        for request_id, (first, entries) in (prompt_logprobs or {}).items():
            try:
                self._add_prompt_logprobs(request_id, first, entries)
            except Exception as exc:
                self._failed[request_id] = exc
        touched: dict[str, ParentState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for req in changed:
            parent_id = self.child_to_parent.get(req.request_id)
            if parent_id is None or req.request_id in self._failed:
                continue
            parent = self.parents[parent_id]
            child = parent.children[req.request_id]
            if parent.first_token_time is None:
                parent.first_token_time = now
                parent.num_cached_tokens = max(0, req.num_cached_tokens)
            try:
                if self._append_new(child, req, logprobs.get(req.request_id)):
                    stopped.append(req.request_id)
                elif req.status.finished:
                    child.completion.finish_reason = req.status.value
                    child.completion.stop_reason = req.stop_reason
            except Exception as exc:  # this request's own tokens or text: it fails alone
                self._failed[req.request_id] = exc
                continue
            touched[parent_id] = parent
        if self._failed:
            failed = {self.child_to_parent.get(c) for c in self._failed}
            touched = {k: p for k, p in touched.items() if k not in failed}
        outputs = [self._output(p) for p in touched.values()]
        return outputs, stopped

    def take_failed(self) -> dict[str, Exception]:
        """The child request ids whose processing raised since the last call, each with
        its exception; they are still live here (the engine fails them)."""
        failed, self._failed = self._failed, {}
        return failed

    def _add_prompt_logprobs(self, request_id: str, first: int, entries: list) -> None:
        parent = self.parents.get(self.child_to_parent.get(request_id, ""))
        if parent is None or parent.prompt_logprobs is None:
            return
        prompt = parent.prompt_token_ids
        # A recompute after preemption scores the same positions again: same values.
        for pos, (chosen, rank, top) in enumerate(entries, start=first):
            previous = prompt[pos - 1] if pos else None
            parent.prompt_logprobs[pos] = self._logprob_entry(
                prompt[pos], previous, chosen, rank, top
            )

    def _logprob_entry(
        self,
        token: int,
        previous: int | None,
        chosen: float,
        rank: int,
        top: list[tuple[int, float]],
    ) -> dict[int, Logprob]:
        """Each candidate's text as it reads after ``previous``, the token before it."""
        before = self.tokenizer.decode([previous]) if previous is not None else ""
        entry = {
            tid: Logprob(lp, r + 1, self._piece(tid, previous, before))
            for r, (tid, lp) in enumerate(top)
        }
        if token not in entry:
            entry[token] = Logprob(chosen, rank, self._piece(token, previous, before))
        return entry

    def _append_new(
        self,
        child: ChildState,
        req: Request,
        logprobs: TokenLogprobs | list[TokenLogprobs] | None,
    ) -> bool:
        """Append the request's tokens this step added (one, or with speculative decoding
        its accepted drafts too), checking stop strings after each as if they had come one
        step at a time. True if a stop string stopped it."""
        outputs = req.output_token_ids
        comp = child.completion
        first = len(comp.token_ids)
        count = max(len(outputs) - first, 1)
        entries = logprobs if isinstance(logprobs, list) else [logprobs]
        for i in range(count):
            index = len(outputs) - count + i
            text_before = len(child.detok.text)
            last = i == count - 1
            entry = entries[i] if i < len(entries) else None
            self._append(child, req, index, entry, finished=last and req.status.finished)
            if comp.finish_reason is None and self._check_stop_strings(child, text_before):
                return True
        return False

    def _append(
        self,
        child: ChildState,
        req: Request,
        index: int,
        logprob: TokenLogprobs | None,
        finished: bool,
    ) -> None:
        outputs = req.output_token_ids
        token = outputs[index]
        comp = child.completion
        comp.token_ids.append(token)
        child.detok.add(token)
        if logprob is not None and comp.logprobs is not None:
            chosen, rank, top = logprob
            previous = outputs[index - 1] if index > 0 else req.prompt_token_ids[-1]
            comp.logprobs.append(self._logprob_entry(token, previous, chosen, rank, top))
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + chosen
        comp.text = self._visible(child, finished=finished)

    def _piece(self, token_id: int, previous: int | None, before: str) -> str:
        """The text ``token_id`` adds after ``previous`` (decoded as ``before``). Decoded
        alone, a SentencePiece token loses its word-boundary space ("▁Paris" reads
        "Paris"); after a neighbour it keeps it, as OpenAI's logprob tokens do (they
        concatenate to the completion's text). Decoded alone where the pair merges (a
        multi-byte character split across tokens)."""
        if previous is not None:
            pair = self.tokenizer.decode([previous, token_id])
            if pair.startswith(before) and len(pair) > len(before):
                return pair[len(before) :]
        piece = self._alone.get(token_id)
        if piece is None:
            piece = self._alone[token_id] = self.tokenizer.decode([token_id])
        return piece

    @staticmethod
    def _visible(child: ChildState, finished: bool) -> str:
        text = child.detok.text
        if child.stop_strings and not finished:
            # Hold back a tail that could still become a stop string.
            hold = max(len(s) for s in child.stop_strings) - 1
            return text[: max(0, len(text) - hold)] if hold else text
        return text

    @staticmethod
    def _check_stop_strings(child: ChildState, text_before: int) -> bool:
        """Find the earliest stop string that ends in the text added this step (it may
        begin in text from earlier tokens). Not before ``min_tokens`` outputs, as vLLM."""
        if not child.stop_strings or len(child.completion.token_ids) <= child.min_tokens:
            return False
        text = child.detok.text
        found: tuple[int, str] | None = None
        for stop in child.stop_strings:
            index = text.find(stop, max(0, text_before - len(stop) + 1))
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is None:
            return False
        index, stop = found
        end = index + len(stop) if child.include_stop else index
        child.completion.text = text[:end]
        child.completion.finish_reason = RequestStatus.FINISHED_STOPPED.value
        child.completion.stop_reason = stop
        return True

    def _output(self, parent: ParentState) -> RequestOutput:
        finished = parent.finished
        out = RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[c.completion for c in parent.children.values()],
            finished=finished,
            prompt_logprobs=parent.prompt_logprobs,
            num_cached_tokens=parent.num_cached_tokens,
        )
        if parent.first_token_time is not None:
            out.metrics["time_to_first_token"] = parent.first_token_time - parent.arrival_time
        if finished:
            self.parents.pop(parent.request_id, None)
            for cid in parent.children:
                self.child_to_parent.pop(cid, None)
        return out

    def abort(self, parent_id: str) -> RequestOutput | None:
        parent = self.parents.get(parent_id)
        if parent is None:
            return None
        for child in parent.children.values():
            if child.completion.finish_reason is None:
                child.completion.finish_reason = RequestStatus.FINISHED_ABORTED.value
        return self._output(parent)
