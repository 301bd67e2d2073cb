"""The CPU platform's fused-op table (bf16/fp16 runs): the same functions as the shared
layers' torch code in fewer torch calls.

At batch 1 a CPU decode step spends about as long dispatching small torch ops as it does
in the matmuls, so what pays here is fewer calls, not faster arithmetic:

* rotary + KV store: the rotary table rows are looked up once per step (every layer
  shares the positions tensor) instead of once per layer; q and k, adjacent in the qkv
  projection's output, rotate as one tensor; the keys and values go straight into the
  cache. Each product and difference is rounded to the run dtype in the order the torch
  code rounds it, so the results are the same.
* RMSNorm through ``F.rms_norm`` in fp32 (one op instead of five), then the same cast and
  weight product as the torch code; only the fp32 sum's order may differ.

fp32 runs get no table: they are the exact reference against HF.
"""

from __future__ import annotations

import torch

from tessellm.interfaces.ops import FusedOps


class _StepCache:
    """Per-step values every layer would otherwise recompute, keyed by the identity of
    the step's tensors (the model runner builds new ones each step)."""

    def __init__(self) -> None:
        self._rows: tuple[object, object, torch.dtype, torch.Tensor, torch.Tensor] | None = None
        self._slots: tuple[object, bool] | None = None

    def cos_sin(
        self, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, 1, D]`` rows ``[cos | cos]`` and ``[-sin | sin]`` in ``dtype``: with them a
        neox rotation is ``x * cos + roll(x, D/2) * sin`` (four torch calls)."""
        rows = self._rows
        if rows is None or rows[0] is not positions or rows[1] is not cos or rows[2] != dtype:
            c = cos[positions].unsqueeze(1).to(dtype)
            s = sin[positions].unsqueeze(1).to(dtype)
            rows = self._rows = (
                positions,
                cos,
                dtype,
                torch.cat((c, c), -1),
                torch.cat((-s, s), -1),
            )
        return rows[3], rows[4]

    def all_slots_valid(self, slot_mapping: torch.Tensor) -> bool:
        if self._slots is None or self._slots[0] is not slot_mapping:
            self._slots = (slot_mapping, bool((slot_mapping >= 0).all()))
        return self._slots[1]


def _joined(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """``[T, Hq + Hk, D]`` over q and k when k's heads follow q's in each row (the split
    of one qkv projection output), else None."""
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return None
    if q.stride(2) != 1 or k.stride(2) != 1 or q.stride(1) != q.shape[2] != k.stride(1):
        return None
    # One row's stride (irrelevant, and arbitrary, for a single row).
    row = q.stride(0) if q.shape[0] > 1 else q.shape[2] * (q.shape[1] + k.shape[1])
    if q.shape[0] > 1 and k.stride(0) != row:
        return None
    if k.data_ptr() != q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size():
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), (row, q.shape[2], 1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # First half x1*cos + x2*(-sin), second x2*cos + x1*sin: each product rounded to the
    # run dtype, then the sum, as the torch code's x1*cos - x2*sin rounds (negation is
    # exact).
    rolled = torch.roll(x, x.shape[-1] // 2, dims=-1)
    return (x * cos).add_(rolled.mul_(signed_sin))


def cpu_fused_ops(dtype: torch.dtype) -> FusedOps | None:
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    cache = _StepCache()

    def rotary_neox(positions, q, k, cos, sin):
        c, s = cache.cos_sin(positions, cos, sin, q.dtype)
        qk = _joined(q, k)
        if qk is None:
            return _rotate(q, c, s), _rotate(k, c, s)
        rotated = _rotate(qk, c, s)
        return rotated[:, : q.shape[1]], rotated[:, q.shape[1] :]

    def rotary_neox_write_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
        q, k = rotary_neox(positions, q, k, cos, sin)
        slots = slot_mapping
        if not cache.all_slots_valid(slot_mapping):
            keep = slot_mapping >= 0
            slots, k, v = slot_mapping[keep], k[keep], v[keep]
        if k.dtype != k_cache.dtype:
            k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)
        return q

    def rms_norm(x, weight, eps, offset):
        normed = torch.rms_norm(x.float(), (x.shape[-1],), None, eps)
        if offset:
            return (normed * (offset + weight.float())).to(x.dtype)
        return weight * normed.to(x.dtype)

    def add_rms_norm(x, residual, weight, eps, offset):
        summed = x + residual
        return rms_norm(summed, weight, eps, offset), summed

    return FusedOps(
        add_rms_norm=add_rms_norm,
        rms_norm=rms_norm,
        rotary_neox=rotary_neox,
        rotary_neox_write_kv=rotary_neox_write_kv,
    )
