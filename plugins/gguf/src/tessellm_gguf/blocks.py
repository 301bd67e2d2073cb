"""GGUF quantized blocks decoded (in torch, on any device) to one common form: integer
codes with a scale and an offset per group of inputs, ``w = code * scale + zero``.

Every type kept quantized fits it exactly (the scales are products of the blocks' fp16
scales and small integers, exact in fp32):

======  =====  =====  ======================  ===========================
type    bits   group  scale                   zero
======  =====  =====  ======================  ===========================
Q4_0    4      32     d                       -8 d
Q4_1    4      32     d                       m
Q5_0    5      32     d                       -16 d
Q5_1    5      32     d                       m
Q8_0    8      32     d                       -128 d (codes are q + 128)
Q4_K    4      32     d * sc[j] (6-bit)       -dmin * m[j] (6-bit)
Q5_K    5      32     d * sc[j]               -dmin * m[j]
Q6_K    6      16     d * sc[j] (int8)        -32 d * sc[j]
======  =====  =====  ======================  ===========================

The unpacking mirrors ``gguf.quants``' numpy dequantizers, the reference in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType
# Types whose matrices stay quantized; others load as dense weights.
KEPT_TYPES = frozenset({QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K})
DENSE_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
QK_K = 256


@dataclass
class GroupedCodes:
    """``w[n, k] = codes[n, k] * scale[n, k // group] + zero[n, k // group]``; codes are
    unsigned, below ``2 ** bits``; scale and zero fp32."""

    codes: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # float32 [N, K / group]
    zero: torch.Tensor
    group: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        c = self.codes.view(n, k // self.group, self.group).float()
        return (c * self.scale[..., None] + self.zero[..., None]).view(n, k)

    @staticmethod
    def cat(parts: list[GroupedCodes]) -> GroupedCodes:
        """Several matrices' codes stacked along the output rows (same group and bits)."""
        first = parts[0]
        return GroupedCodes(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            first.group,
            max(p.bits for p in parts),
        )


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Two-byte little-endian fields (the last dim, size 2) as fp32."""
    return raw.contiguous().view(torch.float16).float().squeeze(-1)


def _nibbles(qs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``qs [..., L]`` bytes as ``[..., 2, L]`` (low nibbles, then high), reshaped."""
    return torch.stack((qs & 0x0F, qs >> 4), dim=-2).reshape(shape)


def _bits_of(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Bit ``i`` of the little-endian ``packed [B, count / 8]`` bytes as ``[B, count]``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).reshape(packed.shape[0], count)


def _q4_0(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:18], (-1, 32)), d[:, None], -8 * d[:, None]


def _q4_1(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:20], (-1, 32)), d[:, None], m[:, None]


def _q5_0(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = _f16(b[:, 0:2])
    q = _nibbles(b[:, 6:22], (-1, 32)) | (_bits_of(b[:, 2:6], 32) << 4)
    return q, d[:, None], -16 * d[:, None]


def _q5_1(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:24], (-1, 32)) | (_bits_of(b[:, 4:8], 32) << 4)
    return q, d[:, None], m[:, None]


def _q8_0(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d = _f16(b[:, 0:2])
    q = (b[:, 2:34].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
    return q, d[:, None], -128 * d[:, None]


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 sub-blocks' 6-bit scales and mins packed in 12 bytes."""
    s = b[:, 4:16].reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mn = torch.cat((m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b)
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32), (-1, QK_K))
    return q, d[:, None] * sc, -(dmin[:, None] * mn)


def _q5_k(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b)
    low = _nibbles(b[:, 48:176].reshape(-1, 4, 32), (-1, 8, 32))
    shifts = torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 8, 1)
    high = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    q = (low | (high << 4)).reshape(-1, QK_K)
    return q, d[:, None] * sc, -(dmin[:, None] * mn)


def _q6_k(b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    ql, qh = b[:, 0:128], b[:, 128:192]
    sc = b[:, 192:208].view(torch.int8).float()
    d = _f16(b[:, 208:210])
    low = _nibbles(ql.reshape(-1, 2, 64), (-1, 8, 32))
    shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
    high = ((qh.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)
    q = (low | (high << 4)).reshape(-1, QK_K)
    scale = d[:, None] * sc
    return q, scale, -32 * scale


# type -> (decoder of [blocks, type size] bytes into (codes, scale, zero) per block, bits,
# group)
_DECODERS: dict[int, tuple[Callable[[torch.Tensor], tuple[torch.Tensor, ...]], int, int]] = {
    QT.Q4_0: (_q4_0, 4, 32),
    QT.Q4_1: (_q4_1, 4, 32),
    QT.Q5_0: (_q5_0, 5, 32),
    QT.Q5_1: (_q5_1, 5, 32),
    QT.Q8_0: (_q8_0, 8, 32),
    QT.Q4_K: (_q4_k, 4, 32),
    QT.Q5_K: (_q5_k, 5, 32),
    QT.Q6_K: (_q6_k, 6, 16),
}


def type_name(qtype: int) -> str:
    try:
        return QT(qtype).name
    except ValueError:
        return f"type {qtype}"


def bytes_per_row(qtype: int, in_features: int) -> int:
    block, type_size = GGML_QUANT_SIZES[QT(qtype)]
    if in_features % block:
        raise ValueError(f"{type_name(qtype)} rows need a multiple of {block} inputs")
    return in_features // block * type_size


def decode(raw: torch.Tensor, qtype: int, in_features: int) -> GroupedCodes:
    """Rows of ``qtype`` blocks (``raw``: uint8 ``[N, bytes per row]``) as codes with group
    scales and zeros; raises ValueError for a type that is not kept quantized."""
    if qtype not in _DECODERS:
        raise ValueError(f"GGUF {type_name(qtype)} blocks are not kept quantized")
    decoder, bits, group = _DECODERS[qtype]
    type_size = GGML_QUANT_SIZES[QT(qtype)][1]
    rows = raw.shape[0]
    if raw.shape[-1] != bytes_per_row(qtype, in_features):
        raise ValueError(
            f"{type_name(qtype)} rows of {in_features} inputs take "
            f"{bytes_per_row(qtype, in_features)} bytes, the checkpoint has {raw.shape[-1]}"
        )
    codes, scale, zero = decoder(raw.reshape(-1, type_size))
    n_groups = in_features // group
    return GroupedCodes(
        codes.reshape(rows, in_features).contiguous(),
        scale.reshape(rows, n_groups).contiguous(),
        zero.reshape(rows, n_groups).contiguous(),
        group,
        bits,
    )


def dense_rows(raw: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    """Rows stored unquantized (F32/F16/BF16 bytes) as a float tensor ``[N, K]``."""
    dtype = DENSE_TYPES.get(qtype)
    if dtype is None:
        raise ValueError(f"GGUF {type_name(qtype)} is neither a kept nor a float type")
    return raw.contiguous().view(dtype).reshape(raw.shape[0], in_features)
