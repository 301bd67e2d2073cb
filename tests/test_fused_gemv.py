"""The persistent GEMV with RMSNorm and SiLU-and-mul folded in, and the ``FusedOps``
entries on it.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) in fp32 on small, ragged shapes with few programs (each walks many
row blocks), against a float64 reference and against ``RMSNorm`` then ``F.linear``; the
residual stream it writes must equal torch's sum bit for bit. On a GPU also in bf16 at
Llama-3-8B's shapes, against the unfused kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_triton_plugins

use_triton_plugins("kernels/triton/src")

from tessellm.interfaces.model import ModelContext, ParallelInfo  # noqa: E402
from tessellm.interfaces.quantization import Unquantized  # noqa: E402
from tessellm.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tessellm.layers.norm import LayerNorm, RMSNorm  # noqa: E402
from tessellm_triton_kernels.dense_gemv import UnquantizedGemv  # noqa: E402
from tessellm_triton_kernels.gemv import GemvConfig, gemv  # noqa: E402
from tessellm_triton_kernels.linear_ops import LinearFusions  # noqa: E402
from tessellm_triton_kernels.norm_gemv import MAX_K, PersistentGemvConfig, norm_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SMALL = PersistentGemvConfig(block_n=2, num_warps=4, programs_per_sm=1)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _reference(x, weight, bias, residual, norm_weight, eps, offset, silu):
    s = x + residual if residual is not None else x  # in the model dtype, as torch rounds
    h = s.double()
    if norm_weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * (offset + norm_weight.double())
    y = h @ weight.double().T + (bias.double() if bias is not None else 0.0)
    if silu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y, s


@pytest.mark.parametrize(
    ("n", "k"),
    [(64, 256), (37, 200), (6, 48)],  # whole tiles; ragged rows and K; few rows
)
@pytest.mark.parametrize(
    ("residual", "norm", "offset", "silu", "bias"),
    [
        (True, True, 0.0, False, False),  # add + RMSNorm + GEMV (the q/k/v projection)
        (False, True, 0.0, False, True),  # the first layer: no residual yet; with a bias
        (True, True, 1.0, False, False),  # Gemma's (1 + weight)
        (True, True, 0.0, True, False),  # add + RMSNorm + GEMV + SiLU-and-mul (gate/up)
        (False, False, 0.0, True, True),  # GEMV + SiLU-and-mul alone
    ],
)
def test_norm_gemv_matches_float64(n, k, residual, norm, offset, silu, bias):
    gen = torch.Generator().manual_seed(n * k + 7 * silu)
    weight = torch.randn(n, k, generator=gen).to(DEVICE)
    # x as a strided view (one row of a wider buffer), as a split of a fused output gives.
    x = torch.randn(3, k + 8, generator=gen).to(DEVICE)[1:2, 4 : 4 + k]
    res = torch.randn(1, k, generator=gen).to(DEVICE) if residual else None
    g = (torch.rand(k, generator=gen) + 0.5).to(DEVICE) if norm else None
    b = torch.randn(n, generator=gen).to(DEVICE) if bias else None
    if silu:  # [gate | up] of n rows each
        weight = torch.cat([weight, torch.randn(n, k, generator=gen).to(DEVICE)])
        b = torch.cat([b, torch.randn(n, generator=gen).to(DEVICE)]) if bias else None
    ref, ref_sum = _reference(x, weight, b, res, g, 1e-6, offset, silu)
    out, summed = norm_gemv(
        x,
        weight,
        b,
        residual=res,
        norm_weight=g,
        eps=1e-6,
        norm_offset=offset,
        silu_and_mul=silu,
        config=SMALL,
    )
    assert out.shape == (1, n) and out.dtype == x.dtype
    assert _rel_err(out, ref) < 1e-5
    assert torch.equal(summed, ref_sum)  # the residual stream, exactly as torch sums it


@pytest.mark.parametrize(("n", "k", "block_n"), [(38, 200, 2), (64, 256, 4), (5, 48, 1)])
@pytest.mark.parametrize(
    ("residual", "offset", "silu", "bias"),
    [(True, 0.0, False, False), (False, 1.0, True, True), (True, 0.0, True, False)],
)
def test_persistent_norm_gemv_equals_rms_norm_then_linear(
    n, k, block_n, residual, offset, silu, bias
):
    # A few programs walk many row blocks each (the interpreter counts 2 SMs), so the
    # double-buffered loop, its last prefetch past the end and ragged rows all run.
    gen = torch.Generator().manual_seed(n + k + block_n)
    norm = RMSNorm(k, 1e-5, torch.float32, offset).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=gen) + 0.5)
    weight = torch.randn(2 * n if silu else n, k, generator=gen).to(DEVICE)
    x = torch.randn(3, k + 8, generator=gen).to(DEVICE)[1:2, 4 : 4 + k]
    res = torch.randn(1, k, generator=gen).to(DEVICE) if residual else None
    b = torch.randn(weight.shape[0], generator=gen).to(DEVICE) if bias else None
    normed, summed = norm(x, res) if residual else (norm(x), x)
    ref = torch.nn.functional.linear(normed, weight, b)
    if silu:
        gate, up = ref.chunk(2, dim=-1)
        ref = torch.nn.functional.silu(gate) * up
    config = PersistentGemvConfig(block_n=block_n, num_warps=4, programs_per_sm=1)
    out, new_residual = norm_gemv(
        x,
        weight,
        b,
        residual=res,
        norm_weight=norm.weight,
        eps=1e-5,
        norm_offset=offset,
        silu_and_mul=silu,
        config=config,
    )
    assert torch.equal(new_residual, summed)
    assert out.shape == ref.shape and _rel_err(out, ref.double()) < 1e-5  # fp32 sum order


def test_norm_gemv_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="one row"):
        norm_gemv(torch.ones(2, 16, device=DEVICE), torch.ones(8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="one row"):
        norm_gemv(torch.ones(1, 2 * MAX_K), torch.ones(2, 2 * MAX_K))
    with pytest.raises(ValueError, match="even"):
        norm_gemv(torch.ones(1, 16, device=DEVICE), torch.ones(7, 16, device=DEVICE),
                  silu_and_mul=True)  # fmt: skip


# ---------------------------------------------------------------- the FusedOps entries


def _ctx(quant) -> ModelContext:
    return ModelContext(torch.float32, torch.device(DEVICE), None, quant, ParallelInfo())  # type: ignore[arg-type]


def _gemv_here() -> UnquantizedGemv:
    # Runs the kernel on this machine's device in fp32 (the interpreter on a CPU).
    config = GemvConfig(block_n=8, block_k=64, num_warps=4)
    return UnquantizedGemv(config, device_types=(DEVICE,), dtypes=(torch.float32,))


def _filled(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return module.to(DEVICE)


def test_rms_norm_linear_equals_norm_then_linear():
    ops = LinearFusions(norm_config=SMALL, silu_config=SMALL)
    ctx = _ctx(_gemv_here())
    norm = _filled(RMSNorm(48, 1e-5, torch.float32), 1)
    qkv = _filled(QKVParallelLinear(48, 8, 4, 2, ctx, bias=True), 2)
    gate_up = _filled(MergedColumnParallelLinear(48, [40, 40], ctx), 3)
    gen = torch.Generator().manual_seed(4)
    x, residual = (torch.randn(1, 48, generator=gen).to(DEVICE) for _ in range(2))

    normed, summed = norm(x, residual)
    out, new_residual = ops.rms_norm_linear(norm, qkv, x, residual, False)
    assert torch.equal(new_residual, summed)
    torch.testing.assert_close(out, qkv(normed), atol=1e-5, rtol=1e-5)

    out, first = ops.rms_norm_linear(norm, gate_up, x, None, True)  # first layer: no residual
    assert first is x
    gate, up = gate_up(norm(x)).chunk(2, dim=-1)
    torch.testing.assert_close(out, torch.nn.functional.silu(gate) * up, atol=1e-5, rtol=1e-5)

    gate, up = gate_up(x).chunk(2, dim=-1)
    torch.testing.assert_close(
        ops.linear_silu_and_mul(gate_up, x),
        torch.nn.functional.silu(gate) * up,
        atol=1e-5,
        rtol=1e-5,
    )


def test_entries_decline_what_the_gemv_does_not_run():
    ops = LinearFusions(norm_config=SMALL, silu_config=SMALL)
    norm = _filled(RMSNorm(32, 1e-5, torch.float32), 1)
    x = torch.randn(1, 32, device=DEVICE)
    gemv_ctx = _ctx(_gemv_here())
    qkv = _filled(QKVParallelLinear(32, 8, 2, 2, gemv_ctx), 2)
    assert ops.rms_norm_linear(norm, qkv, torch.randn(3, 32, device=DEVICE), None, False) is None
    assert ops.rms_norm_linear(norm, qkv, x, None, True) is None  # not a [gate | up] layer
    assert ops.linear_silu_and_mul(qkv, x) is None
    assert ops.rms_norm_linear(_filled(LayerNorm(32), 3), qkv, x, None, False) is None
    # Row-parallel layers all-reduce before the bias: not a column GEMV.
    row = _filled(RowParallelLinear(32, 16, gemv_ctx), 4)
    assert ops.rms_norm_linear(norm, row, x, None, False) is None
    # Plain dense layers keep their own matmul (cuBLAS on a GPU).
    plain = _filled(QKVParallelLinear(32, 8, 2, 2, _ctx(Unquantized())), 5)
    assert ops.rms_norm_linear(norm, plain, x, None, False) is None


@gpu
@pytest.mark.parametrize(("n", "k", "silu"), [(6144, 4096, False), (28672, 4096, True)])
def test_gpu_bf16_llama_shapes_match_the_unfused_kernels(n, k, silu):
    from tessellm_triton_kernels.activation import silu_and_mul
    from tessellm_triton_kernels.norm import add_rms_norm

    gen = torch.Generator(device="cuda").manual_seed(n)
    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    x, residual = (
        torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2)
    )
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5
    normed, summed = add_rms_norm(x, residual, g, 1e-5, 0.0)
    ref = gemv(normed, weight)
    ref = silu_and_mul(ref) if silu else ref
    out, new_residual = norm_gemv(
        x, weight, residual=residual, norm_weight=g, eps=1e-5, silu_and_mul=silu
    )
    assert torch.equal(new_residual, summed)
    # The normed row is rounded as the norm kernel rounds it: only the sum order differs.
    assert _rel_err(out, ref.double()) < 1e-2
