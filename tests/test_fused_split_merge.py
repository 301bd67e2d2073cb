"""Split decode whose partials the last-finishing split merges (no second kernel).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) on tiny shapes, in fp32. Each case is checked against the plain
torch backend and against the separate merge kernel; the merge counters must be back at
zero after every launch (the next layer and the next graph replay reuse them). On a GPU
the check repeats many times in bf16, where a missing ordering between the splits'
stores and the merge would show as a changing result.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_triton_plugins

use_triton_plugins("plugins/attention_triton/src", "plugins/attention_torch/src")

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec  # noqa: E402
from tessellm_attention_torch.backend import TorchPagedAttention  # noqa: E402
from tessellm_attention_triton.backend import (  # noqa: E402
    EXTRA_KEY,
    SPLIT_MERGE_ENV,
    TritonPagedAttention,
    TritonPlan,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _decode_step(context_lens, n_q, n_k, head, block_size, dtype, seed):
    """Query, caches and metadata for one decode token per sequence; a context length of
    0 makes a padding row (no query token), as a padded CUDA-graph batch has."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [max(1, -(-n // block_size)) for n in context_lens]
    num_blocks = sum(per_seq)
    tables = torch.zeros((len(context_lens), max(per_seq)), dtype=torch.int32)
    perm, used = torch.randperm(num_blocks, generator=gen).to(torch.int32), 0
    for s, nb in enumerate(per_seq):
        tables[s, :nb] = perm[used : used + nb]
        used += nb
    q_lens = [1 if n else 0 for n in context_lens]
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(context_lens, dtype=torch.int32)
    shape = (num_blocks, block_size, n_k, head)
    caches = [(torch.randn(shape, generator=gen)).to(DEVICE, dtype) for _ in "kv"]
    query = torch.randn((sum(q_lens), n_q, head), generator=gen).to(DEVICE, dtype)
    metadata = AttentionMetadata(
        query_start_loc=qsl.to(DEVICE),
        seq_lens=lens.to(DEVICE),
        block_tables=tables.to(DEVICE),
        slot_mapping=torch.zeros(sum(q_lens), dtype=torch.int64, device=DEVICE),
        max_query_len=1,
        max_seq_len=max(context_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )
    spec = AttentionSpec(DEVICE, dtype, head, n_q, n_k, block_size)
    return query, caches, metadata, spec


def _run(backend, query, caches, metadata, num_splits, merge, **kw):
    metadata.extra[EXTRA_KEY] = TritonPlan(
        decode=True, num_splits=num_splits, merge_in_decode=merge
    )
    return backend.forward(query, *caches, metadata, scale=0.3, **kw)


@pytest.mark.parametrize("num_splits", [3, 16])
@pytest.mark.parametrize("feature", [{}, {"sliding_window": 20, "logits_soft_cap": 10.0}])
def test_last_split_merge_equals_the_merge_kernel(num_splits, feature):
    # 16 splits leave most ranges of the short contexts empty: they must weigh nothing.
    query, caches, metadata, spec = _decode_step([70, 9, 0, 33], 4, 2, 32, 16, torch.float32, 1)
    backend = TritonPagedAttention(spec)
    ref = TorchPagedAttention(spec).forward(query, *caches, metadata, scale=0.3, **feature)
    by_kernel = _run(backend, query, caches, metadata, num_splits, False, **feature)
    for _ in range(2):  # the second launch finds the counters reset by the first
        merged = _run(backend, query, caches, metadata, num_splits, True, **feature)
        torch.testing.assert_close(merged, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(merged, by_kernel, atol=1e-6, rtol=1e-6)
        assert all(int(c.abs().sum()) == 0 for c in backend._merge_counters)


def test_prepare_allocates_counters_for_split_plans_and_env_picks_the_merge(monkeypatch):
    _, _, metadata, spec = _decode_step([300, 5], 4, 2, 32, 16, torch.float32, 2)
    assert TritonPagedAttention(spec).merge_in_decode is False  # the merge kernel by default
    monkeypatch.setenv(SPLIT_MERGE_ENV, "last_split")
    backend = TritonPagedAttention(spec)
    backend.prepare(metadata)
    plan = metadata.extra[EXTRA_KEY]
    assert plan.num_splits > 1 and plan.merge_in_decode
    assert backend._merge_counters and backend._merge_counters[0].numel() >= 2 * 2
    monkeypatch.setenv(SPLIT_MERGE_ENV, "bogus")
    with pytest.raises(ValueError, match=SPLIT_MERGE_ENV):
        TritonPagedAttention(spec)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_last_split_merge_is_stable_over_many_launches(dtype):
    # Llama-3-8B's heads, one sequence of 640 keys in 64-key splits, plus padding rows.
    query, caches, metadata, spec = _decode_step([640, 0, 0], 32, 8, 128, 16, dtype, 3)
    backend = TritonPagedAttention(spec)
    by_kernel = _run(backend, query, caches, metadata, 10, False)
    first = _run(backend, query, caches, metadata, 10, True)
    torch.testing.assert_close(first.float(), by_kernel.float(), atol=1e-2, rtol=1e-2)
    for _ in range(200):
        assert torch.equal(_run(backend, query, caches, metadata, 10, True), first)
    torch.cuda.synchronize()
    assert int(backend._merge_counters[0].abs().sum()) == 0
