"""Paged attention for the CPU: one batched call per group of sequences per layer.

The reference torch backend loops over sequences in Python in every layer and gathers
each context into a fresh tensor. Here the step's plan (indices, masks) is built once in
``prepare``; per layer, each group's blocks are copied into a buffer that lives as long
as the backend (no allocation per step) and the whole group attends at once:

* decode sequences (one query each) with two batched matmuls around an fp32 softmax,
  every kv head's query group at once (GQA without repeating K/V). For decode this is
  several times faster on the CPU than SDPA's flash kernel, which tiles for long queries;
* prefill and chunked-prefill sequences, padded to the group's longest query, with
  ``scaled_dot_product_attention`` (vectorised, threaded, fp32 accumulation).

A decode group of several sequences computes in ``precision.attention_compute_dtype`` of
the cache's dtype: a bf16 or fp16 cache on a CPU without native instructions for it is
attended in fp32, converting only the blocks the group gathered (and its queries), and
the output is cast back. Such a group is gathered, converted and attended a few
sequences at a time (``DECODE_CHUNK_BYTES``), so each chunk's K/V stay in the CPU's
caches in between. Prefill groups stay in the cache's dtype: SDPA's CPU kernels already
accumulate bf16 in fp32, and fp32 inputs were no faster there (bench/RESULTS.md), so
converting would only change the rounding of every prompt's attention.

A single sequence whose blocks are consecutive in the cache (the usual case at batch 1)
attends over a view of the cache, with no copy at all. Cache entries outside a
sequence's context are read (masked) when a partial block is copied, so they must be
finite; the model runner zero-fills the cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
    AttentionSpec,
)
from tessellm_attention_cpu import precision
from tessellm_attention_cpu.plan import GroupPlan, StepPlan, build_plan
from tessellm_attention_cpu.traced import traced_decode

PLAN_KEY = "cpu_attention_plan"
# The block-diagonal decode (see _decode_block_diagonal) wastes Hkv times the score and
# value arithmetic to avoid copying K/V into matmul layouts: worth it for a batch of
# several sequences and few kv heads (measured: 24% faster at 64 sequences and 3 kv
# heads, a tie at 16, slower at 4).
BLOCK_DIAGONAL_MIN_SEQS = 8
BLOCK_DIAGONAL_MAX_KV_HEADS = 4
# Decode groups attend in chunks of sequences whose gathered K and V (in the compute
# dtype) fit this, so that what one chunk gathers, converts and multiplies stays in the
# caches. Swept on a 2-core AMD EPYC (fp32 compute, one thread, 3 kv heads of 64, busy
# machine, medians of 9 interleaved rounds): 64 sequences of 512 tokens took 39/31/26/
# 23/30 ms a layer at 1/2/3/4/6 MiB against 38 ms unchunked; 16 of 2,048 tokens (one
# sequence a chunk) 25 against 39 ms; 64 of 128 tokens 7.3 against 9.4 ms.
DECODE_CHUNK_BYTES = 4 << 20


def soft_capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    cap: float,
) -> torch.Tensor:
    """``q`` ``[n, H, Tq, D]`` over ``k``/``v`` ``[n, Hkv, Tk, D]`` with ``cap*tanh(s/cap)``
    on the scaled scores, in fp32 (SDPA has no soft-cap)."""
    n, heads, tq, d = q.shape
    kv_heads = k.shape[1]
    qf = q.float().view(n, kv_heads, heads // kv_heads, tq, d)
    scores = torch.einsum("nkgqd,nkld->nkgql", qf, k.float()) * scale
    scores = cap * torch.tanh(scores / cap)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("nkgql,nkld->nkgqd", probs, v.float())
    return out.reshape(n, heads, tq, d).to(q.dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A no-op .to() costs microseconds: a batch-1 decode layer call is ~170 us.
    return x if x.dtype == dtype else x.to(dtype)


class CpuPagedAttention(AttentionBackend):
    name = "cpu"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"cpu"}),
        dtypes=frozenset({torch.float32, torch.bfloat16, torch.float16}),
    )
    # A decode step can be traced once (torch.export) and replayed: under tracing the
    # backend reads only tensors (traced.py), never the host-side plan.
    graph_capturable = True

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__(spec)
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # What the eager path attends decode groups of several sequences in (the KV cache
        # holds spec.dtype: this backend takes no other kv_cache_dtype); a bench may set
        # it to time another choice.
        self.compute_dtype: torch.dtype = precision.attention_compute_dtype(spec.dtype)

    def prepare(self, metadata: AttentionMetadata) -> None:
        metadata.extra[PLAN_KEY] = build_plan(metadata, self.spec.block_size)

    def _plan(self, metadata: AttentionMetadata) -> StepPlan:
        plan = metadata.extra.get(PLAN_KEY)
        if plan is None:  # a caller that skipped prepare(): build it once for the step
            self.prepare(metadata)
            plan = metadata.extra[PLAN_KEY]
        return plan

    def write_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        slots = metadata.slot_mapping
        # A traced decode step has no host-side plan, and every slot is valid in it (one
        # token per real sequence, no padding).
        if not torch.compiler.is_compiling() and not self._plan(metadata).all_slots_valid:
            keep = slots >= 0
            slots, key, value = slots[keep], key[keep], value[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))

    def _buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A ``shape`` view of a buffer of ``dtype`` kept across steps."""
        needed = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < needed:
            # Grow geometrically so a slowly lengthening context reallocates rarely.
            size = max(needed, 2 * buf.numel() if buf is not None else 0)
            buf = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name, dtype] = buf
        return buf[:needed].view(shape)

    def _context(
        self,
        cache: torch.Tensor,
        group: GroupPlan,
        name: str,
        dtype: torch.dtype,
        seqs: slice | None = None,
    ) -> torch.Tensor:
        """The keys or values of the group's sequences (or of ``seqs`` among them) as
        ``[n, context, Hkv, D]`` in ``dtype``: a view of the cache when its blocks are
        consecutive and no conversion is asked, else one gather (plus one conversion of
        what was gathered, when ``dtype`` differs)."""
        block_size, kv_heads, head_size = cache.shape[1:]
        if group.first_block is not None:
            blocks = cache[group.first_block : group.first_block + group.num_blocks]
            context = blocks.view(1, -1, kv_heads, head_size)[:, : group.context_len]
        else:
            ids, num_seqs = group.block_ids, group.num_seqs
            if seqs is not None:
                ids = ids[seqs.start * group.num_blocks : seqs.stop * group.num_blocks]
                num_seqs = seqs.stop - seqs.start
            gathered = self._buffer(
                name, (ids.numel(), *cache.shape[1:]), cache.dtype, cache.device
            )
            torch.index_select(cache, 0, ids, out=gathered)
            length = group.num_blocks * block_size
            context = gathered.view(num_seqs, length, kv_heads, head_size)
        if dtype == cache.dtype:
            return context
        return self._buffer(name, context.shape, dtype, cache.device).copy_(context)

    def _decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        block_diagonal: bool,
        scale: float,
        soft_cap: float | None,
    ) -> torch.Tensor:
        """One query per sequence: ``q`` ``[n, H, D]``, ``k``/``v`` ``[n, L, Hkv, D]``,
        ``bias`` ``[n, 1, 1, L]`` (additive) or None."""
        n, heads, head_size = q.shape
        kv_heads = k.shape[2]
        if block_diagonal:
            return self._decode_block_diagonal(q, k, v, bias, scale, soft_cap)
        if n == 1:
            # One sequence: a batched matmul over kv heads reads K/V in place; in fp32
            # because oneDNN's bf16 path costs more than the conversion at this size.
            grouped = q.view(kv_heads, heads // kv_heads, head_size).float()
            scores = torch.bmm(grouped, k[0].float().permute(1, 2, 0)).mul_(scale)
        else:
            grouped = q.view(n, kv_heads, heads // kv_heads, head_size)
            scores = torch.matmul(grouped, k.permute(0, 2, 3, 1)).float().mul_(scale)
        if soft_cap:
            scores = torch.tanh(scores.div_(soft_cap)).mul_(soft_cap)
        if bias is not None:
            scores.add_(bias if n > 1 else bias[0])
        if n == 1:
            probs = torch.softmax(scores, dim=-1)
            out = torch.bmm(probs, v[0].float().transpose(0, 1))
            return out.to(q.dtype).view(1, heads, head_size)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v.transpose(1, 2))  # [n, Hkv, G, D]
        return out.view(n, heads, head_size)

    def _decode_block_diagonal(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        soft_cap: float | None,
    ) -> torch.Tensor:
        """Decode over gathered ``[n, L, Hkv, D]`` K/V read as plain ``[n, L, Hkv*D]``
        matrices, so no operand is ever copied into another layout: each sequence's
        queries form a block-diagonal ``[Hkv*D, H]`` matrix (head h's query in its kv
        head's rows), one matmul scores every head against every kv head's keys, and the
        diagonal blocks of the value product are kept. That spends Hkv times the (small)
        attention arithmetic to save two copies of the context per layer."""
        n, heads, head_size = q.shape
        length, kv_heads = k.shape[1], k.shape[2]
        group_size = heads // kv_heads
        block_q = torch.zeros((n, kv_heads, head_size, kv_heads, group_size), dtype=k.dtype)
        torch.diagonal(block_q, dim1=1, dim2=3).copy_(
            q.view(n, kv_heads, group_size, head_size).permute(0, 3, 2, 1)
        )
        flat_k = k.reshape(n, length, kv_heads * head_size)
        # Both operands transposed views of contiguous tensors: BLAS reads them as they are.
        queries = block_q.view(n, kv_heads * head_size, heads).transpose(1, 2)
        scores = torch.bmm(queries, flat_k.transpose(1, 2))
        scores = scores.float().mul_(scale)  # [n, H, L]
        if soft_cap:
            scores = torch.tanh(scores.div_(soft_cap)).mul_(soft_cap)
        if bias is not None:
            scores.add_(bias.view(n, 1, length))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        mixed = torch.bmm(probs, v.reshape(n, length, kv_heads * head_size))
        out = torch.diagonal(mixed.view(n, kv_heads, group_size, kv_heads, head_size), 0, 1, 3)
        return out.permute(0, 3, 1, 2).reshape(n, heads, head_size)

    def _attend_decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: GroupPlan,
        dtype: torch.dtype,
        scale: float,
        sliding_window: int | None,
        soft_cap: float | None,
    ) -> torch.Tensor:
        """A decode group's rows ``[n, H, D]``, attended in chunks of sequences whose K/V
        in ``dtype`` fit ``DECODE_CHUNK_BYTES``."""
        n = group.num_seqs
        kv_heads = k_cache.shape[2]
        block_diagonal = n >= BLOCK_DIAGONAL_MIN_SEQS and kv_heads <= BLOCK_DIAGONAL_MAX_KV_HEADS
        bias = group.mask(self.spec.block_size, sliding_window, additive=True)
        args = (block_diagonal, scale, soft_cap)
        chunk = n
        if n > 1:
            seq_bytes = 2 * group.num_blocks * math.prod(k_cache.shape[1:]) * dtype.itemsize
            chunk = max(1, DECODE_CHUNK_BYTES // seq_bytes)
        if chunk >= n:
            k = self._context(k_cache, group, "k", dtype)
            v = self._context(v_cache, group, "v", dtype)
            return self._decode(q, k, v, bias, *args)
        out = torch.empty_like(q)
        for start in range(0, n, chunk):
            seqs = slice(start, min(start + chunk, n))
            k = self._context(k_cache, group, "k", dtype, seqs)
            v = self._context(v_cache, group, "v", dtype, seqs)
            chunk_bias = None if bias is None else bias[seqs]
            out[seqs] = self._decode(q[seqs], k, v, chunk_bias, *args)
        return out

    def _attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: GroupPlan,
        scale: float,
        sliding_window: int | None,
        soft_cap: float | None,
    ) -> torch.Tensor:
        """The group's output rows ``[n * query_len, H, D]`` in padded order, in the
        compute dtype (the caller casts back)."""
        n, q_len = group.num_seqs, group.query_len
        heads, head_size = query.shape[1:]
        # Only decode groups of several sequences convert (the module docstring says why
        # prefill does not). One sequence's decode reads its K/V as fp32 itself
        # (_decode), in place when its blocks are consecutive: converting first was 10%
        # slower.
        dtype = self.compute_dtype if q_len == 1 and n > 1 else k_cache.dtype
        q = query if group.query_rows is None else query.index_select(0, group.query_rows)
        q = _cast(q, dtype)
        if q_len == 1:
            return self._attend_decode(
                q, k_cache, v_cache, group, dtype, scale, sliding_window, soft_cap
            )
        k = self._context(k_cache, group, "k", dtype)
        v = self._context(v_cache, group, "v", dtype)
        q = q.view(n, q_len, heads, head_size).transpose(1, 2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        mask = group.mask(self.spec.block_size, sliding_window)
        if soft_cap:
            out = soft_capped_attention(q, k, v, mask, scale, soft_cap)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != heads
            )
        return out.transpose(1, 2).reshape(n * q_len, heads, head_size)

    def forward(
        self,
        query,
        k_cache,
        v_cache,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return traced_decode(
                query,
                k_cache,
                v_cache,
                metadata.block_tables,
                metadata.seq_lens,
                scale,
                sliding_window,
                logits_soft_cap,
            )
        plan = self._plan(metadata)
        args = (scale, sliding_window, logits_soft_cap)
        decode, prefill = plan.decode, plan.prefill
        if prefill is None and decode is not None and decode.query_rows is None:
            return _cast(self._attend(query, k_cache, v_cache, decode, *args), query.dtype)
        out = torch.empty_like(query)
        if decode is not None:
            rows = self._attend(query, k_cache, v_cache, decode, *args)
            out.index_copy_(0, decode.query_rows, _cast(rows, query.dtype))
        if prefill is not None:
            rows = self._attend(query, k_cache, v_cache, prefill, *args)
            rows = _cast(rows.index_select(0, prefill.valid_rows), query.dtype)
            out.index_copy_(0, prefill.output_rows, rows)
        return out
