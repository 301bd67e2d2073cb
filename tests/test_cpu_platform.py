"""The CPU platform's facts and its fused-op table."""

from __future__ import annotations

import pytest
import torch

from tessellm.errors import ConfigError
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm_attention_torch.backend import TorchPagedAttention
from tessellm_cpu import platform as cpu
from tessellm_cpu.ops import cpu_fused_ops


@pytest.fixture
def flags(monkeypatch):
    def use(*names):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(names))

    return use


def test_dtype_follows_the_cpu(flags):
    flags("avx2", "avx512f", "avx512_bf16")
    assert cpu.CpuPlatform().default_dtype() == torch.bfloat16
    flags("avx2", "amx_bf16")
    assert cpu.CpuPlatform().default_dtype() == torch.bfloat16
    flags("avx2", "avx512f")
    assert cpu.CpuPlatform().default_dtype() == torch.float32


def test_threads_respect_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        cpu.CpuPlatform().set_up_process()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cpu, "physical_cores", lambda: 3)
        cpu.CpuPlatform().set_up_process()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_kv_cache_budget(monkeypatch):
    monkeypatch.setattr(cpu, "mem_available_bytes", lambda: 100 << 30)
    platform = cpu.CpuPlatform()
    monkeypatch.delenv(cpu.KV_SPACE_ENV, raising=False)
    assert platform.available_kv_cache_bytes(0.9, 1 << 30) == cpu.DEFAULT_CPU_KV_CAP
    monkeypatch.setenv(cpu.KV_SPACE_ENV, "1.5")
    assert platform.available_kv_cache_bytes(0.9, 1 << 30) == int(1.5 * (1 << 30))
    monkeypatch.setattr(cpu, "mem_available_bytes", lambda: 2 << 30)
    assert platform.available_kv_cache_bytes(0.5, 1 << 30) == 0  # the model fills the share
    monkeypatch.setenv(cpu.KV_SPACE_ENV, "lots")
    with pytest.raises(ConfigError):
        platform.available_kv_cache_bytes(0.9, 0)


def test_default_quantization_only_outside_fp32():
    platform = cpu.CpuPlatform()
    assert platform.default_quantization(torch.bfloat16) == "woq_grid"
    assert platform.default_quantization(torch.float32) is None
    assert platform.fused_ops(torch.float32) is None


def test_fused_rotary_and_kv_store_equal_the_torch_code():
    from transformers import LlamaConfig

    g = torch.Generator().manual_seed(0)
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=64)
    rotary = RotaryEmbedding(config, 64, 64)
    ops = cpu_fused_ops(torch.bfloat16)
    positions = torch.tensor([3, 17, 40])
    for rows in (1, 3):
        qkv = torch.randn(rows, (4 + 2 + 2) * 64, generator=g).to(torch.bfloat16)
        q = qkv[:, :256].reshape(rows, 4, 64)
        k = qkv[:, 256:384].reshape(rows, 2, 64)
        v = qkv[:, 384:].reshape(rows, 2, 64)
        pos = positions[:rows]
        ref_q, ref_k = rotary(pos, q, k)  # the layer's torch code (no table bound)
        caches = [torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16) for _ in range(4)]
        slots = torch.tensor([5, 33, -1][:rows])
        out_q = ops.rotary_neox_write_kv(pos, q, k, v, rotary.cos, rotary.sin, *caches[:2], slots)
        TorchPagedAttention.write_kv(None, ref_k, v, caches[2], caches[3], _Slots(slots))
        assert torch.equal(out_q, ref_q)
        assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_fused_norms_match_the_torch_code():
    g = torch.Generator().manual_seed(1)
    ops = cpu_fused_ops(torch.bfloat16)
    for offset in (0.0, 1.0):
        norm = RMSNorm(64, 1e-6, torch.bfloat16, offset)
        norm.weight.data = torch.randn(64, generator=g).to(torch.bfloat16)
        x = torch.randn(5, 64, generator=g).to(torch.bfloat16)
        residual = torch.randn(5, 64, generator=g).to(torch.bfloat16)
        ref_normed, ref_sum = norm(x, residual)
        normed, summed = ops.add_rms_norm(x, residual, norm.weight, 1e-6, offset)
        assert torch.equal(summed, ref_sum)
        torch.testing.assert_close(normed, ref_normed, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ops.rms_norm(x, norm.weight, 1e-6, offset), norm(x))


class _Slots:
    """The one metadata field ``write_kv`` reads."""

    def __init__(self, slot_mapping: torch.Tensor) -> None:
        self.slot_mapping = slot_mapping
