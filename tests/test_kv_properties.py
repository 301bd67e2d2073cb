"""Property tests: random add / step / abort / finish sequences against the real
Scheduler + KVCacheManager, with the fake runner of ``test_scheduler`` checking the KV.

After every operation: each block's reference count equals the number of requests that
hold it, no request holds a block twice, a block is in the free queue exactly when no
one holds it, a shared block is a published (cached) one, the cache table agrees with
the blocks, and every request's output so far is what the fake model gives without any
batching, chunking or preemption. When every request has ended the pool is full again.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_scheduler import FakeRunner, make_request, reference_output

from tessellm.engine.kv_cache_manager import KVCacheManager
from tessellm.engine.scheduler import Scheduler, SchedulerConfig
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.request import RequestStatus

# A few shared prefixes, so that prefix hits (and evictions of cached blocks) happen.
PREFIXES = [list(range(3, 3 + 12)), list(range(20, 26)), []]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        num_blocks=st.integers(3, 24),
        block_size=st.sampled_from([1, 2, 4]),
        budget=st.integers(2, 24),
        max_num_seqs=st.integers(1, 6),
        policy=st.sampled_from(["fcfs", "priority"]),
        caching=st.booleans(),
        chunked=st.booleans(),
    )
    def set_up(self, num_blocks, block_size, budget, max_num_seqs, policy, caching, chunked):
        kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=64,
            enable_chunked_prefill=chunked,
            policy=policy,
        )
        self.sched = Scheduler(config, kv)
        self.runner = FakeRunner(self.sched)
        self.ended: list = []
        self.next_id = 0

    @rule(
        prefix=st.sampled_from(PREFIXES),
        suffix=st.lists(st.integers(3, 40), min_size=1, max_size=8),
        max_tokens=st.integers(1, 12),
        priority=st.integers(0, 3),
        n=st.integers(1, 3),
    )
    def add(self, prefix, suffix, max_tokens, priority, n):
        if self.sched.config.policy != "priority":
            priority = 0
        parent = f"r{self.next_id}"
        self.next_id += 1
        for i in range(n):
            request = make_request(f"{parent}#{i}", prefix + suffix, max_tokens, priority)
            request.prompt_leader_id = f"{parent}#0" if i else None
            try:
                self.sched.add_request(request)
            except InvalidRequestError:
                assert request.num_prompt_tokens >= self.sched.max_model_len
                return

    @precondition(lambda self: self.sched.has_unfinished())
    @rule()
    def step(self):
        plan = self.sched.schedule()
        assert plan.num_batched_tokens <= self.sched.config.max_num_batched_tokens or (
            len(plan.seqs) == 1 and not self.sched.config.enable_chunked_prefill
        )
        live = set(self.sched.requests)
        self.sched.update(plan, self.runner.execute(plan))
        self.ended += [r for r in live if r not in self.sched.requests]

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data(), aborted=st.booleans())
    def end_one(self, data, aborted):
        request_id = data.draw(st.sampled_from(sorted(self.sched.requests)))
        status = RequestStatus.FINISHED_ABORTED if aborted else RequestStatus.FINISHED_STOPPED
        (request,) = self.sched.finish_requests([request_id], status)
        assert request.block_ids == [] and request.status is status

    @invariant()
    def blocks_are_accounted_for(self):
        if not hasattr(self, "sched"):
            return
        pool = self.sched.kv.pool
        owners: Counter[int] = Counter()
        for request in self.sched.requests.values():
            assert len(set(request.block_ids)) == len(request.block_ids), "block held twice"
            owners.update(request.block_ids)
            if request.status is not RequestStatus.RUNNING:
                assert request.block_ids == [], "a waiting request holds blocks"
        for block in pool.blocks:
            assert block.ref_count == owners[block.block_id], f"block {block.block_id}"
            assert pool.is_free(block.block_id) == (block.ref_count == 0)
            if block.ref_count > 1:
                assert block.block_hash is not None, "shared without the prefix cache"
            if block.block_hash is not None:
                assert pool.lookup(block.block_hash) == block.block_id or not pool.enable_caching
        assert len(self.sched.running) + len(self.sched.waiting) == len(self.sched.requests)

    @invariant()
    def outputs_match_an_unbatched_run(self):
        if not hasattr(self, "sched"):
            return
        for request in self.sched.requests.values():
            out = request.output_token_ids
            assert out == reference_output(request.prompt_token_ids, len(out))

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # Drain what is left (it must finish on its own), then the pool is full again.
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            self.step()
        assert not self.sched.has_unfinished(), "requests never finished"
        kv = self.sched.kv
        assert kv.num_free_blocks == kv.num_blocks
        assert all(b.ref_count == 0 for b in kv.pool.blocks)


SchedulerMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSchedulerProperties = SchedulerMachine.TestCase
