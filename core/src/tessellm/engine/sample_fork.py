"""The samples of an ``n > 1`` request forked from their prompt's leader, for models whose
recurrent layers have no prefix cache (``docs/architecture.md``, per-layer cache specs).

In the step whose forward computes the end of the leader's prompt, each sibling still
waiting joins as a **fork**: a seq with no tokens to compute (``ScheduledSeq.fork_of``).
The KV cache manager gives it a state slot of its own, the leader's full blocks (one more
reference each, as a prefix hit takes them) and a fresh block for a last partial one
(``HybridKVCacheManager.fork``). After the forward, on the device and in the same launch,
the runner copies the leader's state slot into the fork's, and each page where their
tables differ; the fork's first token is sampled from the leader's last prompt row, with
its own parameters (seed). Anything the copy cannot cover (no free slot or block, a
preempted sample, a manager that does not ``supports_sample_forks``) recomputes the prompt.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from tessellm.engine.transfer import to_device
from tessellm.interfaces.request import Request, RequestStatus
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner
    from tessellm.engine.scheduler import Scheduler, _StepDraft


def fork_sample(scheduler: Scheduler, request: Request, draft: _StepDraft) -> bool:
    """Admit waiting ``request`` as a fork of its prompt leader, when the leader's chunk in
    ``draft`` reaches its prompt's end (a fork takes no token budget); False otherwise."""
    leader_id = request.prompt_leader_id
    if leader_id is None or not scheduler.kv.supports_sample_forks:
        return False
    if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
        return False
    entry = draft.scheduled.get(leader_id)
    if entry is None:
        return False
    leader, num_new = entry
    num_prompt = leader.num_prompt_tokens
    # Only the first computation of the prompt: a resumed leader's state includes outputs.
    if leader.output_token_ids or leader.num_computed_tokens + num_new != num_prompt:
        return False
    if not scheduler.kv.fork(leader, request):
        return False
    request.num_computed_tokens = num_prompt
    request.num_cached_tokens = num_prompt  # reused, as a prefix hit is
    request.status = RequestStatus.RUNNING
    bisect.insort(scheduler.running, request, key=scheduler._rank)
    draft.scheduled[request.request_id] = (request, 0)
    return True


@dataclass(slots=True)
class SampleForks:
    """A plan's forks, split off for the forward (``split``) and served after it."""

    plan: SchedulerOutput  # the whole plan: its sampled seqs are the result's order
    forward: SchedulerOutput  # the seqs that compute tokens
    # Per sampled seq of ``plan``: the index among ``forward``'s sampled seqs of its row.
    rows: list[int]
    state_copies: list[tuple[int, int]]  # (leader's slot, fork's slot)
    page_copies: list[tuple[int, int]]  # (leader's page, fork's page)

    @classmethod
    def split(cls, plan: SchedulerOutput) -> SampleForks | None:
        """None for a plan without forks (the usual step)."""
        if not any(s.fork_of is not None for s in plan.seqs):
            return None
        leaders: dict[str, tuple[int, ScheduledSeq]] = {}
        forward = []
        for seq in plan.seqs:
            if seq.fork_of is None:
                if seq.sample:
                    leaders[seq.request_id] = (len(leaders), seq)
                forward.append(seq)
        seqs, rows, states, pages = [], [], [], []
        for seq in plan.seqs:
            if seq.fork_of is None:
                seqs.append(seq)
                rows.extend([leaders[seq.request_id][0]] if seq.sample else [])
                continue
            if seq.fork_of not in leaders:
                continue  # a part of a plan re-run to find a failing request: no row
            row, leader = leaders[seq.fork_of]
            seqs.append(seq)
            rows.append(row)
            states.append((leader.state_slot, seq.state_slot))
            mine = [seq.block_ids, *seq.group_block_ids]
            for theirs, own in zip([leader.block_ids, *leader.group_block_ids], mine, strict=True):
                pages.extend((a, b) for a, b in zip(theirs, own, strict=False) if a != b)
        plan = replace(plan, seqs=seqs)
        return cls(plan, replace(plan, seqs=forward), rows, states, pages)

    def apply(self, runner: ModelRunner, sample_rows: torch.Tensor) -> torch.Tensor:
        """Copy the leaders' states and differing pages into the forks' (after the forward
        wrote them); return ``sample_rows`` for ``plan``'s sampled seqs."""
        states = [t for layer in runner.stateful_layers for t in layer.state]
        _copy_rows(states, self.state_copies, runner.device)
        pages = {id(t): t for a in runner.attn_layers for t in (a.k_cache, a.v_cache)}
        _copy_rows(list(pages.values()), self.page_copies, runner.device)
        return sample_rows[to_device(torch.tensor(self.rows), runner.device)]


def _copy_rows(
    tensors: list[torch.Tensor], pairs: list[tuple[int, int]], device: torch.device
) -> None:
    """``tensor[dst] = tensor[src]`` for each (src, dst) pair, in each tensor (the sources
    are read before any is written)."""
    if not pairs:
        return
    src = to_device(torch.tensor([a for a, _ in pairs]), device)
    dst = to_device(torch.tensor([b for _, b in pairs]), device)
    for tensor in tensors:
        if tensor.dtype.itemsize == 1:  # fp8 KV caches: no index_copy_ for them on the CPU
            tensor = tensor.view(torch.uint8)
        tensor.index_copy_(0, dst, tensor.index_select(0, src))
