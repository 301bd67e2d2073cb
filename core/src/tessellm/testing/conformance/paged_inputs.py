"""Random paged-attention steps with scattered block tables, and the definition of paged
attention (float64, from the cache contract in ``tessellm.interfaces.attention``) that
backends are compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessellm.interfaces.attention import AttentionMetadata

# (tokens already cached, query tokens) per sequence.
MIXES: dict[str, list[tuple[int, int]]] = {
    # decode, prefill from 0, chunked prefill starting mid-block, a short decode, a
    # one-token prompt
    "mixed": [(37, 1), (0, 20), (40, 9), (5, 1), (0, 1)],
    "decode": [(70, 1), (33, 1), (15, 1), (0, 1), (16, 1)],
    "prefill": [(0, 12), (0, 3), (17, 30)],
    # enough decode sequences for batched decode paths, plus a chunked prefill
    "many": [(n, 1) for n in (70, 33, 15, 0, 16, 47, 5, 31, 64, 2)] + [(20, 7)],
}
# Caches hold large finite values wherever no valid token lives (unused blocks, the tails
# of partial blocks, the block that padding table entries point at): attending to
# anything outside a sequence's context moves the output far beyond any tolerance.
GARBAGE = 1e3


@dataclass
class PagedStep:
    """One step: caches holding every sequence's earlier context, this step's new K/V
    (still to be written through ``write_kv``), queries and metadata."""

    query: torch.Tensor  # [T, H, D]
    key: torch.Tensor  # [T, Hkv, D], this step's keys (written at slot_mapping)
    value: torch.Tensor
    k_cache: torch.Tensor  # before this step's write
    v_cache: torch.Tensor
    metadata: AttentionMetadata

    def fresh_metadata(self) -> AttentionMetadata:
        """A copy with an empty ``extra`` (each backend prepares its own)."""
        m = self.metadata
        return AttentionMetadata(
            query_start_loc=m.query_start_loc,
            seq_lens=m.seq_lens,
            block_tables=m.block_tables,
            slot_mapping=m.slot_mapping,
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            query_start_loc_cpu=m.query_start_loc_cpu,
            seq_lens_cpu=m.seq_lens_cpu,
        )

    def expected_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The caches after this step's K/V are stored at ``slot_mapping``."""
        k, v = self.k_cache.clone(), self.v_cache.clone()
        slots = self.metadata.slot_mapping.long()
        for cache, new in ((k, self.key), (v, self.value)):
            cache.view(-1, *cache.shape[2:])[slots] = new.to(cache.dtype)
        return k, v


def make_step(
    seqs: list[tuple[int, int]],
    *,
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> PagedStep:
    g = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + q for ctx, q in seqs]
    q_lens = [q for _, q in seqs]
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)
    spare = int(order[-1])  # never holds a token; padding entries point at it
    tables = torch.full((len(seqs), max(per_seq) + 2), spare, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k_cache = torch.randn(shape, generator=g) * GARBAGE
    v_cache = torch.randn(shape, generator=g) * GARBAGE
    new_slots, new_k, new_v, used = [], [], [], 0
    for s, (n, nb) in enumerate(zip(seq_lens, per_seq, strict=True)):
        tables[s, :nb] = order[used : used + nb].to(torch.int32)
        used += nb
        pos = torch.arange(n)
        slots = tables[s, pos // block_size].long() * block_size + pos % block_size
        context = n - q_lens[s]
        for cache, new in ((k_cache, new_k), (v_cache, new_v)):
            values = torch.randn((n, num_kv_heads, head_size), generator=g)
            cache.view(-1, num_kv_heads, head_size)[slots[:context]] = values[:context]
            new.append(values[context:])
        new_slots.append(slots[context:])
    query = torch.randn((sum(q_lens), num_heads, head_size), generator=g)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    metadata = AttentionMetadata(
        query_start_loc=qsl.to(device),
        seq_lens=sl.to(device),
        block_tables=tables.to(device),
        slot_mapping=torch.cat(new_slots).to(device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=sl,
    )
    return PagedStep(
        query=query.to(dtype).to(device),
        key=torch.cat(new_k).to(dtype).to(device),
        value=torch.cat(new_v).to(dtype).to(device),
        k_cache=k_cache.to(dtype).to(device),
        v_cache=v_cache.to(dtype).to(device),
        metadata=metadata,
    )


def reference_attention(
    step: PagedStep,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *,
    scale: float,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> torch.Tensor:
    """Paged attention by its definition, in float64 on the CPU: sequence ``s``'s query
    rows sit at the last positions of its context; a query at position ``p`` sees the
    keys at positions ``k <= p`` (and ``p - k < W`` under a window ``W``), each read from
    slot ``block_tables[s][k // block_size] * block_size + k % block_size``."""
    m = step.metadata
    block_size = k_cache.shape[1]
    flat_k = k_cache.detach().cpu().double().flatten(0, 1)
    flat_v = v_cache.detach().cpu().double().flatten(0, 1)
    tables = m.block_tables.cpu().long()
    query = step.query.detach().cpu().double()
    out = torch.zeros_like(query)
    starts, seq_lens = m.query_start_loc_cpu.tolist(), m.seq_lens_cpu.tolist()
    for s, seq_len in enumerate(seq_lens):
        lo, hi = starts[s], starts[s + 1]
        pos = torch.arange(seq_len)
        slots = tables[s, pos // block_size] * block_size + pos % block_size
        k, v = flat_k[slots], flat_v[slots]  # [L, Hkv, D]
        q = query[lo:hi]  # [q, H, D]
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        q_pos = torch.arange(seq_len - (hi - lo), seq_len)
        allowed = pos[None, :] <= q_pos[:, None]
        if sliding_window:
            allowed &= (q_pos[:, None] - pos[None, :]) < sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out
