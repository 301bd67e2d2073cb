"""``interfaces.speculative.BatchedProposer``: requests that can take no drafts are left
out, the rest go to ``propose_batch`` in order, at most ``max_batch`` at a time
(``max_num_seqs``, or ``disable_by_batch_size`` where smaller), and each gets its own
batch's drafts back in its place."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest

from tessellm.interfaces.speculative import BatchedProposer, ProposerContext, SpeculativeConfig


class EchoProposer(BatchedProposer):
    """Drafts ``[id] * limit``; a request of id 0 can take none, one of id 1 only one."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        super().__init__(config, context)
        self.batches: list[list[tuple[int, int]]] = []

    def draft_limit(self, request, wanted: int) -> int:
        return 0 if request.id == 0 else min(wanted, request.id)

    def propose_batch(self, requests: Sequence, limits: Sequence[int]) -> list[list[int]]:
        self.batches.append([(r.id, limit) for r, limit in zip(requests, limits, strict=True)])
        return [[r.id] * limit for r, limit in zip(requests, limits, strict=True)]


def make(max_num_seqs: int, disable_by_batch_size: int) -> EchoProposer:
    config = SpeculativeConfig("echo", disable_by_batch_size=disable_by_batch_size)
    args = SimpleNamespace(max_num_seqs=max_num_seqs)
    return EchoProposer(config, ProposerContext(args, None, None, 256, 512))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_num_seqs", "disable", "max_batch"), [(4, 0, 4), (4, 2, 2), (2, 8, 2), (3, 32, 3)]
)
def test_batches_of_at_most_max_batch_in_order(max_num_seqs, disable, max_batch):
    proposer = make(max_num_seqs, disable)
    assert proposer.max_batch == max_batch
    ids = [3, 0, 5, 1, 0, 2, 4]
    requests = [SimpleNamespace(id=i) for i in ids]
    drafts = proposer.propose(requests, [3] * len(ids))
    assert drafts == [[3] * 3, [], [5] * 3, [1], [], [2] * 2, [4] * 3]
    taken = [(3, 3), (5, 3), (1, 1), (2, 2), (4, 3)]
    assert proposer.batches == [taken[i : i + max_batch] for i in range(0, 5, max_batch)]


def test_no_batch_when_nothing_can_take_drafts():
    proposer = make(4, 0)
    requests = [SimpleNamespace(id=0), SimpleNamespace(id=2)]
    assert proposer.propose(requests, [3, 0]) == [[], []]
    assert proposer.batches == []
    assert proposer.propose([], []) == []
