"""The GPTQ and AWQ 4-bit checkpoint layouts: packing, unpacking, the reference quantizer.

Both formats store, for one linear of ``K`` inputs and ``N`` outputs quantized in groups
of ``G`` inputs, 4-bit integers ``q``, a 4-bit zero point ``z`` and an fp16 scale ``s``
per group and output, and mean ``w[n, k] = (q[k, n] - z[g, n]) * s[g, n]`` with
``g = g_idx[k]`` (GPTQ) or ``k // G`` (AWQ). Eight 4-bit values share an int32, the
first in the lowest bits.

- GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"): ``qweight`` int32 ``[K/8, N]``
  packed along K in order; ``qzeros`` int32 ``[ceil(K/G), N/8]`` packed along N in order,
  holding ``z - 1`` (the "v1" convention; a 15 there, v1's -1, reads as zero point 0);
  ``scales`` ``[ceil(K/G), N]``; ``g_idx`` int32 ``[K]``, each input's group, which
  act-order (``desc_act``) checkpoints permute. ``sym`` checkpoints have ``z = 8``.
  GPTQModel's "gptq_v2" stores ``z`` itself.
- AWQ (AutoAWQ GEMM): ``qweight`` int32 ``[K, N/8]`` packed along N, nibble ``i`` of a
  word holding output ``8 c + AWQ_ORDER[i]``; ``qzeros`` int32 ``[K/G, N/8]`` the same
  way, ``z`` itself; ``scales`` ``[K/G, N]``.
"""

from __future__ import annotations

import torch

PACK = 8  # 4-bit values per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def pack_along_rows(values: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` 4-bit values → int32 ``[R/8, C]``, row ``8 r + j`` in bits ``4 j``."""
    v = values.to(torch.int32).view(-1, PACK, values.shape[1]) & 0xF
    shifted = v << SHIFTS.to(v.device).view(1, PACK, 1)
    return shifted.sum(dim=1, dtype=torch.int64).to(torch.int32)  # disjoint bits: sum = or


def unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R/8, C]`` → ``[R, C]`` 4-bit values (int32); inverse of :func:`pack_along_rows`."""
    v = (packed.unsqueeze(1) >> SHIFTS.to(packed.device).view(1, PACK, 1)) & 0xF
    return v.reshape(-1, packed.shape[1])


def pack_along_cols(values: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """``[R, C]`` 4-bit values → int32 ``[R, C/8]``; nibble ``i`` holds column
    ``8 c + order[i]`` (``order`` None: ``i``)."""
    v = values.to(torch.int32).view(values.shape[0], -1, PACK) & 0xF
    if order is not None:
        v = v[..., list(order)]
    shifted = v << SHIFTS.to(v.device)
    return shifted.sum(dim=-1, dtype=torch.int64).to(torch.int32)


def unpack_along_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 ``[R, C/8]`` → ``[R, C]``; inverse of :func:`pack_along_cols`."""
    v = (packed.unsqueeze(-1) >> SHIFTS.to(packed.device)) & 0xF
    if order is not None:
        v = v[..., [order.index(c) for c in range(PACK)]]
    return v.reshape(packed.shape[0], -1)


def quantize_groups(
    weight: torch.Tensor,
    group_of_input: torch.Tensor,
    groups: int,
    sym: bool,
    include_zero: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of an ``[N, K]`` weight, one scale and zero per
    output and group of inputs (``group_of_input[k]``): asymmetric over ``[min, max]`` of
    the group (with ``include_zero``, widened to hold 0, as GPTQ's quantizer does; AWQ's
    does not), or symmetric, ``z = 8``, with the smallest scale that holds the group in
    ``[-8, 7]`` steps (a weight already on such a grid is kept exactly).
    Returns ``q [K, N]``, ``zeros [groups, N]`` (int32), ``scales [groups, N]`` (fp16);
    the rounding uses the fp16 scale, so the stored triple reproduces it."""
    w = weight.detach().float().t()  # [K, N]
    index = group_of_input.long().view(-1, 1).expand_as(w)
    zero = torch.zeros(groups, w.shape[1])
    low_start = zero if include_zero else zero.fill_(float("inf"))
    low = low_start.scatter_reduce(0, index, w, "amin", include_self=True)
    high_start = torch.zeros_like(low) if include_zero else torch.full_like(low, float("-inf"))
    high = high_start.scatter_reduce(0, index, w, "amax", include_self=True)
    if sym:
        scales = torch.maximum(-low.clamp(max=0) / 8, high.clamp(min=0) / 7)
    else:
        scales = (high - low) / 15
    scales = scales.half().float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.full_like(scales, 8) if sym else (-low / scales).round().clamp(0, 15)
    per_input = group_of_input.long()
    q = (w / scales[per_input] + zeros[per_input]).round().clamp(0, 15)
    return q.to(torch.int32), zeros.to(torch.int32), scales.half()


def gptq_tensors(
    weight: torch.Tensor,
    group_size: int,
    sym: bool,
    desc_act: bool,
    v2_zeros: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint's ``qweight``/``qzeros``/``scales``/``g_idx`` for ``weight``
    ``[N, K]``. With ``desc_act`` the inputs are grouped in a shuffled order (GPTQ orders
    them by activation size; any order is a valid checkpoint); ``generator`` (default:
    seeded by ``K``, so the matrices sharing one input, fused q/k/v, get one order, as
    GPTQ's do) draws it."""
    in_features = weight.shape[1]
    size = in_features if group_size == -1 else group_size
    groups = num_groups(in_features, size)
    order = torch.arange(in_features)
    if desc_act:
        generator = generator or torch.Generator().manual_seed(in_features)
        order = torch.randperm(in_features, generator=generator)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // size).to(torch.int32)
    q, zeros, scales = quantize_groups(weight, g_idx, groups, sym)
    stored_zeros = zeros if v2_zeros else (zeros - 1) & 0xF
    return {
        "qweight": pack_along_rows(q),
        "qzeros": pack_along_cols(stored_zeros),
        "scales": scales,
        "g_idx": g_idx,
    }


def awq_tensors(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """An AutoAWQ GEMM checkpoint's ``qweight``/``qzeros``/``scales`` for ``[N, K]``
    ``weight`` (asymmetric; AWQ's activation-aware scaling is folded into the weight
    before this step, so a plain weight is a valid input)."""
    in_features = weight.shape[1]
    groups = num_groups(in_features, group_size)
    g_idx = torch.arange(in_features) // group_size
    q, zeros, scales = quantize_groups(weight, g_idx, groups, sym=False, include_zero=False)
    return {
        "qweight": pack_along_cols(q, AWQ_ORDER),
        "qzeros": pack_along_cols(zeros, AWQ_ORDER),
        "scales": scales,
    }


def gptq_zeros(qzeros: torch.Tensor, v2_zeros: bool) -> torch.Tensor:
    stored = unpack_along_cols(qzeros)
    return stored if v2_zeros else (stored + 1) & 0xF
