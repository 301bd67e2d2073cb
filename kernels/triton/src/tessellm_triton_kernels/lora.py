"""Batched multi-LoRA in Triton: Punica/S-LoRA's shrink and expand.

A step mixes tokens of several adapters (and of the base model). Each adapted layer keeps
its adapters stacked by slot, ``A`` ``[S, R, K]`` and ``B`` ``[S, N, R]``; a token ``t``
of slot ``s_t`` gets ``out_t += (x_t A[s_t]^T * scale) B[s_t]^T``. Two paths, both
correct for any layout of the step's tokens (``LoRATokens``), chosen by its host-side
bound on the tokens of one slot:

- segments (prefill, and decode with several sequences per adapter): the tokens sorted
  by slot once per step; a program owns a tile of one slot's tokens and multiplies it by
  that slot's matrix with ``tl.dot``, so a matrix is read once per tile of its tokens,
  not once per token. The grid is ``(token tiles x column tiles, [split-K,] slots)`` and
  programs past their slot's tokens return at once.
- per token (batch 1, and decode with one sequence per adapter): a program owns one
  token and reads its slot from ``slots``: no sort, no 16-row padding of ``tl.dot``,
  and the shrink's long ``K`` split over programs so one token still fills the GPU.

The shrink accumulates in fp32 (split-K partials added atomically into an fp32 output
that starts at zero, which also leaves the rows of tokens without an adapter at zero);
the expand rounds the shrunk rows to the weights' dtype (as the torch path does), sums
in fp32, and adds to ``out`` in place at a column offset, so each piece of a fused
layer (q/k/v, gate/up) writes its own columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.interfaces.ops import LoRATokens

# Per-token kernels when no slot has more tokens than this; above it, reading each
# matrix once per tile of tokens beats reading it once per token.
PER_TOKEN_MAX_TOKENS = 2
# Enough programs to give every SM of a large GPU a few (split-K target), each walking
# at least a few K steps (fewer would spend more on atomic adds than on the product).
# Untuned guesses: bench/lora_gpu.py is where to tune them.
TARGET_PROGRAMS = 512
MIN_K_STEPS_PER_SPLIT = 4
BLOCK_K_SHRINK = 64
BLOCK_N_EXPAND = 64
NUM_WARPS = 4


# Set-up shared by the kernels (inlined by Triton): which tokens and columns a program
# owns, and where its slot's matrix starts.
@triton.jit
def _segment_tile(starts_ptr, num_n, SLOT_AXIS: tl.constexpr, BLOCK_M: tl.constexpr):
    """A segment program's slot, first row in ``order``, the end of its slot's rows and
    its column tile; rows from ``first`` on past ``end`` are none of its tokens."""
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    slot = tl.program_id(SLOT_AXIS)
    start = tl.load(starts_ptr + slot)
    end = tl.load(starts_ptr + slot + 1)
    return slot, start + pid_m * BLOCK_M, end, pid_n


@triton.jit
def _segment_tokens(order_ptr, first, end, BLOCK_M: tl.constexpr):
    """The token ids of rows ``first ..`` of the sorted order, and which rows are real."""
    rows = first + tl.arange(0, BLOCK_M)
    m_ok = rows < end
    tokens = tl.load(order_ptr + rows, mask=m_ok, other=0).to(tl.int64)
    return tokens, m_ok


@triton.jit
def _token_slot(slots_ptr):
    """A per-token program's token (axis 0) and its slot (-1: no adapter)."""
    token = tl.program_id(0).to(tl.int64)
    return token, tl.load(slots_ptr + token)


@triton.jit
def _columns(pid_n, n, BLOCK_N: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < n


@triton.jit
def _k_split(split, k_per_split, K, BLOCK_K: tl.constexpr):
    """The shrink's reduction range for split-K program ``split``: offsets within a step,
    its first column and its end."""
    k_begin = split * k_per_split
    return tl.arange(0, BLOCK_K), k_begin, tl.minimum(k_begin + k_per_split, K)


@triton.jit
def _write_shrunk(y_ptrs, y, mask, ATOMIC: tl.constexpr):
    # Split-K partials add up in the zeroed fp32 output; one split owns its values.
    if ATOMIC:
        tl.atomic_add(y_ptrs, y, mask=mask)
    else:
        tl.store(y_ptrs, y, mask=mask)


@triton.jit
def _add_in_place(o_ptrs, delta, mask):
    """``o += delta`` summed in fp32, stored in ``o``'s dtype."""
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptrs, (o + delta).to(o_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _slot_matrix(ptr, slot, stride_s):
    # int64: slot * stride can pass int32 with many slots of large matrices.
    return ptr + slot.to(tl.int64) * stride_s


@triton.jit
def _shrink_segment_kernel(
    x_ptr,
    a_ptr,
    y_ptr,
    order_ptr,
    starts_ptr,
    R,
    K,
    stride_xm,
    stride_as,
    stride_ar,
    stride_ym,
    scale,
    k_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    IEEE: tl.constexpr,
):
    slot, first, end, pid_n = _segment_tile(starts_ptr, tl.cdiv(R, BLOCK_N), 2, BLOCK_M)
    if first >= end:
        return
    tokens, m_ok = _segment_tokens(order_ptr, first, end, BLOCK_M)
    cols, n_ok = _columns(pid_n, R, BLOCK_N)
    ks, k_begin, k_end = _k_split(tl.program_id(1), k_per_split, K, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xm + (k_begin + ks)[None, :]
    # A's tile transposed ([BLOCK_K, BLOCK_N]) for x A^T.
    a_ptrs = (
        _slot_matrix(a_ptr, slot, stride_as) + cols[None, :] * stride_ar + (k_begin + ks)[:, None]
    )
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_ok = (k + ks) < k_end
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, a, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, a, acc)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    acc = acc * scale
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + cols[None, :]
    _write_shrunk(y_ptrs, acc, m_ok[:, None] & n_ok[None, :], ATOMIC)


@triton.jit
def _shrink_token_kernel(
    x_ptr,
    a_ptr,
    y_ptr,
    slots_ptr,
    R,
    K,
    stride_xm,
    stride_as,
    stride_ar,
    stride_ym,
    scale,
    k_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    token, slot = _token_slot(slots_ptr)
    if slot < 0:
        return
    cols, n_ok = _columns(tl.program_id(2), R, BLOCK_N)
    ks, k_begin, k_end = _k_split(tl.program_id(1), k_per_split, K, BLOCK_K)
    x_ptrs = x_ptr + token * stride_xm + k_begin + ks
    a_ptrs = (
        _slot_matrix(a_ptr, slot, stride_as) + cols[:, None] * stride_ar + (k_begin + ks)[None, :]
    )
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_ok = (k + ks) < k_end
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += a * x[None, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    y = tl.sum(acc, axis=1) * scale
    y_ptrs = y_ptr + token * stride_ym + cols
    _write_shrunk(y_ptrs, y, n_ok, ATOMIC)


@triton.jit
def _expand_segment_kernel(
    u_ptr,
    b_ptr,
    out_ptr,
    order_ptr,
    starts_ptr,
    N,
    R,
    stride_um,
    stride_bs,
    stride_bn,
    stride_om,
    offset,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    slot, first, end, pid_n = _segment_tile(starts_ptr, tl.cdiv(N, BLOCK_N), 1, BLOCK_M)
    if first >= end:
        return
    tokens, m_ok = _segment_tokens(order_ptr, first, end, BLOCK_M)
    ks, k_ok = _columns(0, R, BLOCK_K)
    cols, n_ok = _columns(pid_n, N, BLOCK_N)
    u = tl.load(
        u_ptr + tokens[:, None] * stride_um + ks[None, :],
        mask=m_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    b = tl.load(
        _slot_matrix(b_ptr, slot, stride_bs) + cols[None, :] * stride_bn + ks[:, None],
        mask=k_ok[:, None] & n_ok[None, :],
        other=0.0,
    )
    u = u.to(b.dtype)
    if IEEE:
        delta = tl.dot(u, b, input_precision="ieee")
    else:
        delta = tl.dot(u, b)
    o_ptrs = out_ptr + tokens[:, None] * stride_om + offset + cols[None, :]
    _add_in_place(o_ptrs, delta, m_ok[:, None] & n_ok[None, :])


@triton.jit
def _expand_token_kernel(
    u_ptr,
    b_ptr,
    out_ptr,
    slots_ptr,
    N,
    R,
    stride_um,
    stride_bs,
    stride_bn,
    stride_om,
    offset,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token, slot = _token_slot(slots_ptr)
    if slot < 0:
        return
    ks, k_ok = _columns(0, R, BLOCK_K)
    cols, n_ok = _columns(tl.program_id(1), N, BLOCK_N)
    b = tl.load(
        _slot_matrix(b_ptr, slot, stride_bs) + cols[:, None] * stride_bn + ks[None, :],
        mask=n_ok[:, None] & k_ok[None, :],
        other=0.0,
    )
    u = tl.load(u_ptr + token * stride_um + ks, mask=k_ok, other=0.0)
    u = u.to(b.dtype).to(tl.float32)
    delta = tl.sum(b.to(tl.float32) * u[None, :], axis=1)
    _add_in_place(out_ptr + token * stride_om + offset + cols, delta, n_ok)


def _pow2_at_least_16(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _rows_block(max_tokens: int) -> int:
    return min(64, _pow2_at_least_16(max_tokens))


def _split_k(k: int, block_k: int, programs: int) -> tuple[int, int]:
    """(splits, columns per split, a multiple of ``block_k``) giving about
    ``TARGET_PROGRAMS`` programs in all."""
    steps = triton.cdiv(k, block_k)
    most = max(1, steps // MIN_K_STEPS_PER_SPLIT)
    wanted = max(1, min(most, triton.cdiv(TARGET_PROGRAMS, max(1, programs))))
    per_split = triton.cdiv(steps, wanted) * block_k
    return triton.cdiv(k, per_split), per_split


def _check_tokens(tokens: LoRATokens, num_tokens: int, num_slots: int) -> None:
    if tokens.slots.shape[0] != num_tokens or tokens.starts.shape[0] != num_slots + 1:
        raise ValueError(
            f"LoRATokens for {tokens.slots.shape[0]} tokens and "
            f"{tokens.starts.shape[0] - 1} slots; the inputs have {num_tokens} and {num_slots}"
        )


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, tokens: LoRATokens, scale: float = 1.0
) -> torch.Tensor:
    """``x_t a[s_t]^T * scale`` per token, in fp32 (``[T, R]``; zero where ``s_t = -1``).

    ``x`` ``[T, K]`` (rows may be strided), ``a`` ``[S, R, K]``, ``x`` in ``a``'s dtype
    (cast if not).
    """
    num_tokens, k = x.shape
    num_slots, r, k_a = a.shape
    if k != k_a:
        raise ValueError(f"x has {k} columns, the LoRA A matrices {k_a}")
    _check_tokens(tokens, num_tokens, num_slots)
    y = torch.zeros((num_tokens, r), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or num_slots == 0:
        return y
    if x.dtype != a.dtype:
        x = x.to(a.dtype)
    if x.stride(1) != 1:
        x = x.contiguous()
    if a.stride(2) != 1:
        a = a.contiguous()
    block_k = min(BLOCK_K_SHRINK, _pow2_at_least_16(k))
    if tokens.max_tokens_per_slot <= PER_TOKEN_MAX_TOKENS:
        block_n = min(64, _pow2_at_least_16(r))
        n_blocks = triton.cdiv(r, block_n)
        splits, per_split = _split_k(k, block_k, num_tokens * n_blocks)
        _shrink_token_kernel[(num_tokens, splits, n_blocks)](
            x, a, y, tokens.slots, r, k, x.stride(0), a.stride(0), a.stride(1), y.stride(0),
            float(scale), per_split,
            BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=splits > 1, num_warps=NUM_WARPS,
        )  # fmt: skip
        return y
    block_m = _rows_block(tokens.max_tokens_per_slot)
    block_n = min(64, _pow2_at_least_16(r))
    tiles = triton.cdiv(tokens.max_tokens_per_slot, block_m) * triton.cdiv(r, block_n)
    splits, per_split = _split_k(k, block_k, tiles * num_slots)
    _shrink_segment_kernel[(tiles, splits, num_slots)](
        x, a, y, tokens.order, tokens.starts, r, k,
        x.stride(0), a.stride(0), a.stride(1), y.stride(0), float(scale), per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ATOMIC=splits > 1,
        IEEE=a.dtype == torch.float32, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


def lora_expand(
    u: torch.Tensor, b: torch.Tensor, out: torch.Tensor, tokens: LoRATokens, offset: int = 0
) -> torch.Tensor:
    """``out[t, offset:offset + N] += u_t b[s_t]^T`` in place (rows with ``s_t = -1``
    untouched); returns ``out``.

    ``u`` ``[T, R]`` (a shrink's output, or columns of it), ``b`` ``[S, N, R]`` (a view
    of wider matrices will do: its last dimension contiguous), ``out`` ``[T, >= offset
    + N]`` with contiguous rows.
    """
    num_tokens, r = u.shape
    num_slots, n, r_b = b.shape
    if r != r_b:
        raise ValueError(f"u has {r} columns, the LoRA B matrices {r_b}")
    if out.shape[0] != num_tokens or out.shape[1] < offset + n or out.stride(1) != 1:
        raise ValueError(
            f"out of shape {tuple(out.shape)} (strides {out.stride()}) cannot take {n} "
            f"columns at {offset} for {num_tokens} tokens"
        )
    _check_tokens(tokens, num_tokens, num_slots)
    if num_tokens == 0 or num_slots == 0 or n == 0:
        return out
    if u.stride(1) != 1:
        u = u.contiguous()
    if b.stride(2) != 1:
        b = b.contiguous()
    block_k = _pow2_at_least_16(r)
    block_n = BLOCK_N_EXPAND
    n_blocks = triton.cdiv(n, block_n)
    if tokens.max_tokens_per_slot <= PER_TOKEN_MAX_TOKENS:
        _expand_token_kernel[(num_tokens, n_blocks)](
            u, b, out, tokens.slots, n, r, u.stride(0), b.stride(0), b.stride(1), out.stride(0),
            offset, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=NUM_WARPS,
        )  # fmt: skip
        return out
    block_m = _rows_block(tokens.max_tokens_per_slot)
    tiles = triton.cdiv(tokens.max_tokens_per_slot, block_m) * n_blocks
    _expand_segment_kernel[(tiles, num_slots)](
        u, b, out, tokens.order, tokens.starts, n, r,
        u.stride(0), b.stride(0), b.stride(1), out.stride(0), offset,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=b.dtype == torch.float32, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
