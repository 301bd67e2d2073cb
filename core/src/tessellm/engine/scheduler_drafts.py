"""Speculative decoding's share of planning a step: the draft tokens a decoding request
takes into the step, and the KV slots reserved past its tokens for a compiled
verification step (``num_lookahead_slots``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessellm.interfaces.engine import Request

if TYPE_CHECKING:
    from tessellm.engine.scheduler import Scheduler, _StepDraft


class SpeculativePlanningMixin:
    """The default scheduler's draft and lookahead planning (``Scheduler._plan_running``
    calls both for each request it schedules)."""

    def _lookahead(self: Scheduler, request: Request, num_new: int) -> int:
        """KV slots to reserve past a decode's tokens this step (``num_lookahead_slots``,
        speculative decoding): a compiled verification step pads every decode of the step,
        drafts or not, to ``1 + k`` tokens within its own blocks. Only where free blocks
        allow: a reserve never preempts anyone."""
        slots = self.config.num_lookahead_slots
        if not slots or request.num_computed_tokens + num_new < request.num_tokens:
            return 0  # off, or a prompt chunk
        want = min(1 + slots - num_new, self.max_model_len - request.num_computed_tokens - num_new)
        if want <= 0 or not self.kv.can_allocate(request, num_new + want):
            return 0
        return want

    def _take_drafts(self: Scheduler, request: Request, draft: _StepDraft) -> int:
        """Take a decoding request's speculative drafts into this step, as many as the
        budget, the context, ``max_tokens`` and free blocks allow; return how many."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        num_tokens = request.num_tokens
        if request.num_computed_tokens != num_tokens - 1:
            return 0  # not decoding (a stale guess)
        room = min(draft.budget - 1, self.max_model_len - num_tokens)
        if request.params.max_tokens is not None:
            room = min(room, request.params.max_tokens - len(request.output_token_ids) - 1)
        drafts = drafts[: max(room, 0)]
        # Drafts never preempt anyone: without blocks for them the step decodes one token.
        if not drafts or not self.kv.can_allocate(request, 1 + len(drafts)):
            return 0
        draft.drafts[request.request_id] = drafts
        return len(drafts)
