"""The XLA path's host-side pieces and its attention math, on plain CPU tensors (they
run in every venv): padding buckets, step packing, the gather-based attention against
the torch reference backend, and the inputs given to torch-xla's ragged paged attention
kernel against that kernel's own reference (where torch-xla is installed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm.interfaces.schedule import PLACEHOLDER_TOKEN, ScheduledSeq
from tessellm.sampling_params import SamplingParams
from tessellm_tpu.attention import XlaPagedAttention, gather_attention, interleave_kv
from tessellm_tpu.buckets import Buckets, StepShape, power_of_two_buckets
from tessellm_tpu.step_inputs import pack_step

BLOCK = 4


def test_buckets_bound_the_shapes():
    assert power_of_two_buckets(16, 100) == (16, 32, 64, 100)
    assert power_of_two_buckets(16, 8) == (8,)
    buckets = Buckets.for_engine(64, 6, 300, 16, min_tokens=16, min_context=128)
    assert buckets.token_buckets == (16, 32, 64)
    assert buckets.context_buckets == (8, 16, 19)  # blocks of 16: 128, 256, 300 tokens
    assert buckets.max_seqs == 8
    assert buckets.shape_for(17, 3, 9) == StepShape(32, 8, 16)
    assert buckets.shape_for(5, 5, 1) == StepShape(16, 8, 8)
    assert len(buckets.all_shapes()) == 9
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        buckets.shape_for(65, 1, 1)


def seq(rid, tokens, start, blocks, sample=True) -> ScheduledSeq:
    return ScheduledSeq(rid, tokens, start, blocks, sample, SamplingParams(temperature=0.0))


def test_padding_is_inert_and_placeholders_are_fed_on_the_device():
    seqs = [seq("a", [5, 6, 7], 0, [3]), seq("b", [PLACEHOLDER_TOKEN], 6, [1, 4])]
    step = pack_step(seqs, StepShape(8, 4, 2), BLOCK, scratch_slot=40, feed_rows={"b": 3})
    assert step.field("input_ids").tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert step.field("positions").tolist() == [0, 1, 2, 6, 0, 0, 0, 0]
    assert step.field("slot_mapping").tolist() == [12, 13, 14, 18, 40, 40, 40, 40]
    assert step.field("feed_src").tolist() == [-1, -1, -1, 3, -1, -1, -1, -1]
    assert step.field("token_seq").tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert step.field("sample_rows").tolist() == [2, 3, 0, 0]
    assert step.field("seq_lens").tolist() == [3, 7, 0, 0]
    assert step.field("block_tables").reshape(4, 2).tolist() == [[3, 0], [1, 4], [0, 0], [0, 0]]
    assert step.field("query_start_loc").tolist() == [0, 3, 4, 4, 4]
    assert step.field("num_seqs").tolist() == [2]
    assert step.field("greedy").tolist() == [1, 1, 1, 1]


def random_batch(seed: int, num_heads: int = 4, num_kv_heads: int = 2, head: int = 8):
    """A mixed step (a chunked prefill, two decodes, a fresh prompt) over scattered
    blocks, with the cache full of values outside every context."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 24
    q_lens, ctx = [5, 1, 1, 3], [13, 9, 1, 3]
    order = torch.randperm(num_blocks - 1, generator=gen).tolist()
    tables, taken = [], 0
    for length in ctx:
        count = -(-length // BLOCK)
        tables.append(order[taken : taken + count])
        taken += count
    k = torch.randn(num_blocks, BLOCK, num_kv_heads, head, generator=gen) * 3
    v = torch.randn(num_blocks, BLOCK, num_kv_heads, head, generator=gen) * 3
    q = torch.randn(sum(q_lens), num_heads, head, generator=gen)
    return q, k, v, q_lens, ctx, tables


def reference_output(q, k, v, q_lens, ctx, tables, **kw):
    from tessellm_attention_torch.backend import TorchPagedAttention

    width = max(map(len, tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), dtype=torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32)
    meta = AttentionMetadata(cu, lens, table, torch.zeros(0, dtype=torch.long), max(q_lens),
                             max(ctx), cu, lens)  # fmt: skip
    spec = AttentionSpec("cpu", torch.float32, q.shape[2], q.shape[1], k.shape[2], BLOCK)
    return TorchPagedAttention(spec).forward(q, k, v, meta, scale=0.3, **kw)


def xla_inputs(q_lens, ctx, tables, width):
    token_seq = torch.tensor(np.repeat(np.arange(len(q_lens)), q_lens), dtype=torch.int32)
    positions = torch.tensor(
        [c - n + i for n, c in zip(q_lens, ctx, strict=True) for i in range(n)], dtype=torch.int32
    )
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return table, token_seq, positions


@pytest.mark.parametrize("window, cap", [(None, None), (4, None), (None, 5.0)])
def test_gather_attention_equals_the_torch_reference(window, cap):
    q, k, v, q_lens, ctx, tables = random_batch(0)
    kv = interleave_kv(k.flatten(0, 1), v.flatten(0, 1)).view(k.shape[0], BLOCK, -1, k.shape[3])
    # A table wider than any context (a bucket's padding) must change nothing.
    table, token_seq, positions = xla_inputs(q_lens, ctx, tables, width=6)
    got = gather_attention(q, kv, table, token_seq, positions, scale=0.3, sliding_window=window,
                           logits_soft_cap=cap)  # fmt: skip
    want = reference_output(q, k, v, q_lens, ctx, tables, sliding_window=window,
                            logits_soft_cap=cap)  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_write_kv_scatters_interleaved_rows_and_padding_into_scratch():
    spec = AttentionSpec("xla", torch.float32, 8, 4, 2, BLOCK)
    kv = torch.zeros(3, BLOCK, 4, 8)  # two blocks and the scratch block
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([5, 0, 8], dtype=torch.int32)  # the last: padding, into scratch
    meta = AttentionMetadata(None, None, None, slots, 1, 1, None, None)
    XlaPagedAttention(spec).write_kv(key, value, kv, kv, meta)
    flat = kv.view(-1, 4, 8)
    torch.testing.assert_close(flat[5, 0::2], key[0])
    torch.testing.assert_close(flat[5, 1::2], value[0])
    torch.testing.assert_close(flat[0, 0::2], key[1])
    assert flat[[1, 2, 3, 4, 6, 7]].abs().sum() == 0


def test_the_ragged_kernel_inputs_give_the_kernels_reference_result():
    """What the step runner hands torch-xla's ragged paged attention on a TPU (cache,
    context lengths, block table, query offsets, sequence count, padding included), run
    through that kernel's reference implementation, equals the gather path."""
    custom_kernel = pytest.importorskip(
        "torch_xla.experimental.custom_kernel", reason="torch-xla is not installed here"
    )
    q, k, v, q_lens, ctx, tables = random_batch(1)
    kv = interleave_kv(k.flatten(0, 1), v.flatten(0, 1)).view(k.shape[0], BLOCK, -1, k.shape[3])
    table, token_seq, positions = xla_inputs(q_lens, ctx, tables, width=4)
    padded_seqs = 8
    table = torch.cat([table, torch.zeros(padded_seqs - len(ctx), 4, dtype=torch.int32)])
    seq_lens = torch.tensor(ctx + [0] * (padded_seqs - len(ctx)), dtype=torch.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    qsl = torch.tensor(list(cu) + [cu[-1]] * (padded_seqs - len(ctx)), dtype=torch.int32)
    num_seqs = torch.tensor([len(ctx)], dtype=torch.int32)
    want = gather_attention(q, kv, table, token_seq, positions, scale=0.3)
    got = custom_kernel._ragged_paged_attention_nonkernel(
        q, kv, seq_lens, table, qsl, num_seqs, None, None, sm_scale=0.3
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_tensor_parallelism_is_refused_with_a_reason():
    from types import SimpleNamespace

    from tessellm.errors import ConfigError
    from tessellm_tpu.platform import TpuPlatform

    spec = AttentionSpec("xla", torch.float32, 8, 4, 2, BLOCK)
    runner = SimpleNamespace(
        attention=XlaPagedAttention(spec), parallel=SimpleNamespace(world_size=2)
    )
    with pytest.raises(ConfigError, match="tensor parallelism is not implemented"):
        TpuPlatform().step_runner(runner)
