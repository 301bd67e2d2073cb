"""The CPU paged-attention backend against the plain-torch reference backend.

Caches hold large finite garbage wherever no valid token lives (unused blocks, the tails
of partial last blocks, the block that padding table entries point at), so attending to
anything outside a sequence's context changes the output far beyond the tolerance.
"""

from __future__ import annotations

import pytest
import torch

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_cpu.plan import build_plan
from tessellm_attention_torch.backend import TorchPagedAttention

# (tokens already cached, query tokens) per sequence: decode, prefill from 0, chunked
# prefill starting mid-block, a short decode, a one-token prompt.
MIXED = [(37, 1), (0, 20), (40, 9), (5, 1), (0, 1)]
DECODE = [(70, 1), (33, 1), (15, 1), (0, 1), (16, 1)]
PREFILL = [(0, 12), (0, 3), (17, 30)]
# Enough decode sequences for the block-diagonal decode path, plus a chunked prefill.
MANY = [(n, 1) for n in (70, 33, 15, 0, 16, 47, 5, 31, 64, 2)] + [(20, 7)]
GARBAGE = 1e3


class Batch:
    """A hand-built step with scattered block tables; caches hold this step's K/V."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        *,
        block_size: int = 16,
        num_heads: int = 8,
        num_kv_heads: int = 2,
        head_size: int = 32,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        contiguous: bool = False,
    ) -> None:
        g = torch.Generator().manual_seed(seed)
        seq_lens = [ctx + q for ctx, q in seqs]
        q_lens = [q for _, q in seqs]
        per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(per_seq) + 3
        order = (
            torch.arange(1, num_blocks) if contiguous else torch.randperm(num_blocks, generator=g)
        )
        spare = int(order[-1])  # never holds a token; padding entries point at it
        tables = torch.full((len(seqs), max(per_seq) + 2), spare, dtype=torch.int32)
        new_slots, used = [], 0
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        self.k_cache = (torch.randn(shape, generator=g) * GARBAGE).to(dtype)
        self.v_cache = (torch.randn(shape, generator=g) * GARBAGE).to(dtype)
        for s, (n, nb) in enumerate(zip(seq_lens, per_seq, strict=True)):
            tables[s, :nb] = order[used : used + nb].to(torch.int32)
            used += nb
            pos = torch.arange(n)
            slots = tables[s, pos // block_size].long() * block_size + pos % block_size
            for cache in (self.k_cache, self.v_cache):
                flat = cache.view(-1, num_kv_heads, head_size)
                flat[slots] = torch.randn((n, num_kv_heads, head_size), generator=g).to(dtype)
            new_slots.append(slots[n - q_lens[s] :])
        num_tokens = sum(q_lens)
        self.query = torch.randn((num_tokens, num_heads, head_size), generator=g).to(dtype)
        qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        sl = torch.tensor(seq_lens, dtype=torch.int32)
        self.metadata = AttentionMetadata(
            query_start_loc=qsl,
            seq_lens=sl,
            block_tables=tables,
            slot_mapping=torch.cat(new_slots),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=sl,
        )
        self.spec = AttentionSpec(
            "cpu", dtype, head_size, num_heads, num_kv_heads, block_size, True, True
        )
        self.scale = head_size**-0.5

    def reference(self, **kw) -> torch.Tensor:
        backend = TorchPagedAttention(self.spec)
        out = backend.forward(self.query, self.k_cache, self.v_cache, self.metadata, **kw)
        return out.float()

    def cpu(self, backend: CpuPagedAttention | None = None, prepare: bool = True, **kw):
        backend = backend or CpuPagedAttention(self.spec)
        self.metadata.extra.clear()
        if prepare:
            backend.prepare(self.metadata)
        out = backend.forward(self.query, self.k_cache, self.v_cache, self.metadata, **kw)
        return out.float()


def assert_close(batch: Batch, atol: float = 2e-5, **kw) -> None:
    kw.setdefault("scale", batch.scale)
    torch.testing.assert_close(batch.cpu(**kw), batch.reference(**kw), atol=atol, rtol=1e-4)


@pytest.mark.parametrize(
    "seqs", [MIXED, DECODE, PREFILL, MANY], ids=["mixed", "decode", "prefill", "many"]
)
@pytest.mark.parametrize("block_size", [16, 4])
def test_matches_reference(seqs, block_size):
    assert_close(Batch(seqs, block_size=block_size))


@pytest.mark.parametrize("seqs", [MIXED, DECODE, MANY], ids=["mixed", "decode", "many"])
def test_sliding_window_and_soft_cap(seqs):
    batch = Batch(seqs, seed=1)
    assert_close(batch, sliding_window=7)
    assert_close(batch, logits_soft_cap=5.0)
    assert_close(batch, sliding_window=20, logits_soft_cap=2.0)


@pytest.mark.parametrize("query_len", [1, 13])
@pytest.mark.parametrize("contiguous", [True, False])
def test_single_sequence(query_len, contiguous):
    batch = Batch([(35, query_len)], num_heads=4, num_kv_heads=4, contiguous=contiguous)
    plan = build_plan(batch.metadata, batch.spec.block_size)
    group = plan.decode if query_len == 1 else plan.prefill
    assert (group.first_block is not None) == contiguous
    assert_close(batch)
    assert_close(batch, sliding_window=5)


@pytest.mark.parametrize("seqs", [MIXED, MANY], ids=["mixed", "many"])
def test_bfloat16_close_to_fp32_reference(seqs):
    batch = Batch(seqs, dtype=torch.bfloat16, seed=2)
    assert_close(batch, atol=3e-2)


def test_buffers_reused_across_steps_of_different_sizes():
    backend = CpuPagedAttention(Batch(DECODE).spec)
    for seqs, seed in ((DECODE, 3), (MIXED, 4), (DECODE[:2], 5), (MIXED, 6)):
        batch = Batch(seqs, seed=seed)
        torch.testing.assert_close(
            batch.cpu(backend, scale=batch.scale), batch.reference(scale=batch.scale)
        )


def test_forward_without_prepare_builds_the_plan():
    batch = Batch(MIXED, seed=7)
    out = batch.cpu(prepare=False, scale=batch.scale)
    assert "cpu_attention_plan" in batch.metadata.extra
    torch.testing.assert_close(out, batch.reference(scale=batch.scale))


def test_write_kv_skips_padding_slots():
    batch = Batch(MIXED, seed=8)
    spec = batch.spec
    n = batch.metadata.slot_mapping.numel()
    key = torch.randn(n, spec.num_kv_heads, spec.head_size)
    value = torch.randn(n, spec.num_kv_heads, spec.head_size)
    batch.metadata.slot_mapping[1] = -1
    ref_k, ref_v = batch.k_cache.clone(), batch.v_cache.clone()
    TorchPagedAttention(spec).write_kv(key, value, ref_k, ref_v, batch.metadata)
    backend = CpuPagedAttention(spec)
    backend.prepare(batch.metadata)
    assert not batch.metadata.extra["cpu_attention_plan"].all_slots_valid
    backend.write_kv(key, value, batch.k_cache, batch.v_cache, batch.metadata)
    assert torch.equal(batch.k_cache, ref_k) and torch.equal(batch.v_cache, ref_v)


def test_refuses_other_devices():
    spec = AttentionSpec("cuda", torch.float32, 64, 8, 2, 16)
    assert any("device" in reason for reason in CpuPagedAttention.validate(spec))
    assert CpuPagedAttention.validate(AttentionSpec("cpu", torch.bfloat16, 64, 9, 3, 16)) == []


def test_many_kv_heads_take_the_matmul_decode():
    # Above BLOCK_DIAGONAL_MAX_KV_HEADS the block-diagonal form would waste too much.
    batch = Batch(MANY, num_heads=8, num_kv_heads=8, seed=9)
    assert_close(batch)
    assert_close(batch, sliding_window=9, logits_soft_cap=3.0)
