"""Rotary with the KV-cache store in one kernel, alone and through the ``Attention`` layer.

Without a GPU the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1``, set before
any kernel is defined) on tiny shapes. The reference is the torch rotary followed by the
plain store at the slots; caches start as NaN so any slot written by mistake shows, and
slot -1 (padding) must leave the cache untouched.
"""

from __future__ import annotations

import pytest
import torch
from conftest import use_triton_plugins

use_triton_plugins("kernels/triton/src", "plugins/attention_torch/src")

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec  # noqa: E402
from tessellm.interfaces.model import ModelContext, ParallelInfo  # noqa: E402
from tessellm.interfaces.quantization import Unquantized  # noqa: E402
from tessellm.layers.attention import Attention  # noqa: E402
from tessellm.layers.rotary import RotaryEmbedding  # noqa: E402
from tessellm_attention_torch.backend import TorchPagedAttention  # noqa: E402
from tessellm_triton_kernels.ops import triton_fused_ops  # noqa: E402
from tessellm_triton_kernels.rotary_kv import rotary_neox_write_kv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _RopeConfig:
    rope_parameters = {"rope_theta": 10000.0, "rope_type": "default"}


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def _step(tokens, n_q, n_k, head, block_size, dtype, seed):
    """Strided q/k/v views of one qkv output, positions, slots with one padding token."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (n_q + 2 * n_k) * head, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_q * head, n_k * head, n_k * head], dim=-1)
    q, k, v = (t.reshape(tokens, -1, head) for t in (q, k, v))
    positions = torch.randint(0, 200, (tokens,), generator=gen).to(DEVICE)
    num_blocks = 4
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[tokens // 2] = -1  # a padding token: nothing stored
    caches = [
        torch.full((num_blocks, block_size, n_k, head), float("nan"), dtype=dtype, device=DEVICE)
        for _ in "kv"
    ]
    return q, k, v, positions, slots.to(DEVICE), caches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_q", "n_k", "head", "block_size"), [(6, 2, 32, 16), (3, 3, 40, 8)])
def test_rotary_write_kv_matches_rotary_then_store(dtype, n_q, n_k, head, block_size):
    q, k, v, positions, slots, (k_cache, v_cache) = _step(
        7, n_q, n_k, head, block_size, dtype, seed=head
    )
    rope = RotaryEmbedding(_RopeConfig(), head, max_position=256).to(DEVICE)
    ref_q, ref_k = rope(positions, q, k)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    live = slots >= 0
    ref_k_cache.view(-1, n_k, head)[slots[live]] = ref_k[live]
    ref_v_cache.view(-1, n_k, head)[slots[live]] = v[live]

    out_q = rotary_neox_write_kv(positions, q, k, v, rope.cos, rope.sin, k_cache, v_cache, slots)
    torch.testing.assert_close(out_q, ref_q, **_tol(dtype))
    # NaN where nothing was stored (unused slots, the padding token's) on both sides.
    torch.testing.assert_close(k_cache, ref_k_cache, equal_nan=True, **_tol(dtype))
    assert torch.equal(v_cache.isnan(), ref_v_cache.isnan())
    assert torch.equal(v_cache.nan_to_num(), ref_v_cache.nan_to_num())  # v is copied as is


def _metadata(slots: torch.Tensor) -> AttentionMetadata:
    # One prompt of len(slots) tokens in blocks 0.. of the cache (positions 0..T-1).
    tokens = slots.shape[0]
    qsl = torch.tensor([0, tokens], dtype=torch.int32)
    lens = torch.tensor([tokens], dtype=torch.int32)
    return AttentionMetadata(
        query_start_loc=qsl.to(DEVICE),
        seq_lens=lens.to(DEVICE),
        block_tables=torch.arange(4, dtype=torch.int32, device=DEVICE)[None, :],
        slot_mapping=slots,
        max_query_len=tokens,
        max_seq_len=tokens,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )


def test_attention_layer_takes_the_fused_store_and_attends_the_same():
    n_q, n_k, head, block_size, tokens = 4, 2, 32, 16, 6
    spec = AttentionSpec(DEVICE, torch.float32, head, n_q, n_k, block_size)
    ctx = ModelContext(
        torch.float32,
        torch.device(DEVICE),
        TorchPagedAttention(spec),
        Unquantized(),
        ParallelInfo(),
    )
    rope = RotaryEmbedding(_RopeConfig(), head, max_position=256).to(DEVICE)
    q, k, v, _, _, _ = _step(tokens, n_q, n_k, head, block_size, torch.float32, seed=3)
    positions = torch.arange(tokens, device=DEVICE)
    metadata = _metadata(torch.arange(tokens, device=DEVICE))
    results = []
    for table in (None, triton_fused_ops(["rotary_neox_write_kv"])):
        layer = Attention(n_q, head, head**-0.5, n_k, ctx)
        caches = [torch.zeros(4, block_size, n_k, head, device=DEVICE) for _ in "kv"]
        layer.bind_kv_cache(*caches)
        layer.fused_ops = table
        out = layer(q, k, v, metadata, positions=positions, rotary=rope)
        results.append((out, *caches))
    for plain, fused in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="positions"):
        layer(q, k, v, metadata, rotary=rope)


@gpu
def test_gpu_llama_shapes_bf16():
    test_rotary_write_kv_matches_rotary_then_store(torch.bfloat16, 32, 8, 128, 16)
