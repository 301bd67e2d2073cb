"""Batch-1 decode through fp8 weights: ``y = (x @ q.T) * scale + bias`` for one row, in Triton.

At one token a linear layer's time is its weight's bytes over memory bandwidth, so fp8
weights (one byte) should take half of bf16's time. ``_scaled_mm`` does not get there at
one row: it first quantizes the activation (a kernel of its own) and cuBLASLt's fp8 tiles
are built for many rows (issue 13's first H100 figures: fp8 147 tok/s against bf16's 180).
This kernel reads each weight byte once, widens it to fp32 against the unquantized
activation (weight-only at one row: no activation rounding), sums in fp32 and applies the
per-output-channel scale once at the end.

The kernel is the GEMV of tessellm-triton-kernels (the package's ``[cuda]`` extra), given
the fp8 weight and its channel scales; the weight may be the ``_scaled_mm`` layout (rows
and columns zero-padded to 16): only the first ``N`` rows and ``K`` columns are read.
"""

from __future__ import annotations

import torch

from tessellm_triton_kernels.gemv import GemvConfig, gemv

# 4096 one-byte columns per step keep 16 KB of loads in flight per program, as the bf16
# GEMV's 2048 two-byte columns do.
FP8_CONFIG = GemvConfig(block_n=4, block_k=4096, num_warps=4)


def fp8_gemv(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``(x @ q[:N, :K].T) * scale[:N] + bias`` for ``x`` of one row ``[1, K]``; ``q``
    float8_e4m3fn ``[>= N, >= K]`` (row-major), ``scale`` float32 ``[>= N]``; the output
    is ``[1, out_features]`` in ``x``'s dtype."""
    return gemv(x, q, bias, config or FP8_CONFIG, scale=scale, out_features=out_features)
