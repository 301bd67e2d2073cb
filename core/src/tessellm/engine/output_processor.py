"""Turns sampled tokens into text, applies stop strings, and builds RequestOutputs.

A parent request with ``n > 1`` fans out into ``n`` child requests (sharing the prompt's
KV blocks through the prefix cache); their completions are gathered here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tessellm.engine.detokenizer import IncrementalDetokenizer
from tessellm.engine.request import Request, RequestStatus
from tessellm.outputs import CompletionOutput, Logprob, RequestOutput


@dataclass(slots=True)
class ChildState:
    index: int
    detok: IncrementalDetokenizer
    completion: CompletionOutput
    stop_strings: list[str]
    include_stop: bool


@dataclass(slots=True)
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, ChildState] = field(default_factory=dict)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(c.completion.finish_reason is not None for c in self.children.values())


def child_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{parent_id}#{index}"


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add(self, parent_id: str, prompt: str | None, children: list[Request]) -> None:
        state = ParentState(parent_id, prompt, children[0].prompt_token_ids)
        for index, req in enumerate(children):
            params = req.params
            detok = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, params.skip_special_tokens
            )
            completion = CompletionOutput(
                index,
                "",
                [],
                0.0 if params.logprobs is not None else None,
                [] if params.logprobs is not None else None,
            )
            state.children[req.request_id] = ChildState(
                index, detok, completion, params.stop_strings, params.include_stop_str_in_output
            )
            self.child_to_parent[req.request_id] = parent_id
        self.parents[parent_id] = state

    def child_ids(self, parent_id: str) -> list[str]:
        state = self.parents.get(parent_id)
        return list(state.children) if state else []

    def process(
        self, changed: list[Request], logprobs: dict[str, Any]
    ) -> tuple[list[RequestOutput], list[str]]:
        """Returns outputs of parents that changed and child ids stopped by a stop string."""
        touched: dict[str, ParentState] = {}
        stopped: list[str] = []
        now = time.monotonic()
        for req in changed:
            parent_id = self.child_to_parent.get(req.request_id)
            if parent_id is None:
                continue
            parent = self.parents[parent_id]
            child = parent.children[req.request_id]
            if parent.first_token_time is None:
                parent.first_token_time = now
                parent.num_cached_tokens = max(0, req.num_cached_tokens)
            self._append(child, req, logprobs.get(req.request_id))
            if child.completion.finish_reason is None and self._check_stop_strings(child):
                stopped.append(req.request_id)
            elif req.status.finished:
                child.completion.finish_reason = req.status.value
                child.completion.stop_reason = req.stop_reason
            touched[parent_id] = parent
        outputs = [self._output(p) for p in touched.values()]
        return outputs, stopped

    def _append(self, child: ChildState, req: Request, logprob: Any) -> None:
        token = req.output_token_ids[-1]
        comp = child.completion
        comp.token_ids.append(token)
        child.detok.add(token)
        if logprob is not None and comp.logprobs is not None:
            chosen, top = logprob
            entry = {
                tid: Logprob(lp, rank + 1, self._piece(tid)) for rank, (tid, lp) in enumerate(top)
            }
            if token not in entry:
                entry[token] = Logprob(chosen, None, self._piece(token))
            comp.logprobs.append(entry)
            comp.cumulative_logprob = (comp.cumulative_logprob or 0.0) + chosen
        comp.text = self._visible(child, finished=req.status.finished)

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _visible(child: ChildState, finished: bool) -> str:
        text = child.detok.text
        if child.stop_strings and not finished:
            # Hold back a tail that could still become a stop string.
            hold = max(len(s) for s in child.stop_strings) - 1
            return text[: max(0, len(text) - hold)] if hold else text
        return text

    def _check_stop_strings(self, child: ChildState) -> bool:
        text = child.detok.text
        for stop in child.stop_strings:
            index = text.find(stop)
            if index >= 0:
                end = index + len(stop) if child.include_stop else index
                child.completion.text = text[:end]
                child.completion.finish_reason = RequestStatus.FINISHED_STOPPED.value
                child.completion.stop_reason = stop
                return True
        return False

    def _output(self, parent: ParentState) -> RequestOutput:
        finished = parent.finished
        out = RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=[c.completion for c in parent.children.values()],
            finished=finished,
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
