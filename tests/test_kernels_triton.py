"""Fused Triton kernels against the torch code of the layers they stand in for.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined), on small shapes. Inputs are random, strided where the model passes
strided views, and outputs are compared with the layer's own torch path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_triton_plugins

use_triton_plugins("kernels/triton/src")

from tessellm.interfaces.ops import FusedOps, bind_fused_ops  # noqa: E402
from tessellm.layers.activation import GatedActivation  # noqa: E402
from tessellm.layers.norm import RMSNorm  # noqa: E402
from tessellm.layers.rotary import RotaryEmbedding  # noqa: E402
from tessellm_triton_kernels.ops import triton_fused_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = triton_fused_ops()
# The interpreter emulates bf16 through numpy; fp32 is what it runs exactly.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_with_and_without_residual(dtype, offset, hidden):
    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-6, dtype=dtype, offset=offset).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=gen))
    # x as a strided view (every other row of a wider buffer), as a split would give.
    wide = torch.randn(14, hidden + 8, generator=gen).to(DEVICE, dtype)
    x = wide[::2, :hidden]
    residual = torch.randn(7, hidden, generator=gen).to(DEVICE, dtype)
    ref_plain = norm(x)
    ref_out, ref_sum = norm(x, residual)
    norm.fused_ops = OPS
    out_plain = norm(x)
    out, summed = norm(x, residual)
    torch.testing.assert_close(out_plain, ref_plain, **tolerance(dtype))
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    assert torch.equal(summed, ref_sum)  # the residual add rounds exactly as torch does


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    gen = torch.Generator().manual_seed(1)
    act = GatedActivation("silu")
    x = (torch.randn(5, 2 * 1500, generator=gen) * 4).to(DEVICE, dtype)  # two column blocks
    ref = act(x)
    act.fused_ops = OPS
    out = act(x)
    assert out.shape == (5, 1500)
    torch.testing.assert_close(out, ref, **tolerance(dtype))


def test_gelu_activation_ignores_the_silu_kernel():
    act = GatedActivation("gelu")
    act.fused_ops = FusedOps(silu_and_mul=lambda x: pytest.fail("silu kernel used for gelu"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(act(x), torch.nn.functional.gelu(x[:, :4]) * x[:, 4:])


class _RopeConfig:
    rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_neox_on_strided_qkv(dtype):
    gen = torch.Generator().manual_seed(2)
    head, n_q, n_k, tokens = 32, 6, 2, 9
    rope = RotaryEmbedding(_RopeConfig(), head, max_position=256).to(DEVICE)
    qkv = torch.randn(tokens, (n_q + 2 * n_k) * head, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : n_q * head].reshape(tokens, n_q, head)
    k = qkv[:, n_q * head : (n_q + n_k) * head].reshape(tokens, n_k, head)
    positions = torch.randint(0, 256, (tokens,), generator=gen).to(DEVICE)
    ref_q, ref_k = rope(positions, q, k)
    before = qkv.clone()
    rope.fused_ops = OPS
    out_q, out_k = rope(positions, q, k)
    torch.testing.assert_close(out_q, ref_q, **tolerance(dtype))
    torch.testing.assert_close(out_k, ref_k, **tolerance(dtype))
    assert torch.equal(qkv, before)  # the inputs are left as they were


def test_bind_reaches_every_layer_that_declares_fused_ops():
    model = torch.nn.Sequential(RMSNorm(8), GatedActivation("silu"), torch.nn.Linear(4, 4))
    assert bind_fused_ops(model, OPS) == 2
    assert model[0].fused_ops is OPS and model[1].fused_ops is OPS
    assert set(OPS.names()) == {
        "add_rms_norm",
        "rms_norm",
        "silu_and_mul",
        "rotary_neox",
        "rotary_neox_write_kv",
        "linear_silu_and_mul",
        "rms_norm_linear",
        "lora_shrink",
        "lora_expand",
    }
    with pytest.raises(ValueError, match="unknown fused op"):
        triton_fused_ops(["nope"])
