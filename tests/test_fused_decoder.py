"""The shared decoder with every fused entry bound, against the same decoder without.

A two-layer Llama body (random weights, fp32) runs a prompt and then one decode token,
once with no fused-op table and once with the Triton table whose linear-fused entries
take one-row inputs (``unquantized_gemv`` widened to this machine's device and fp32, so
the kernels run in Triton's interpreter without a GPU). The prompt goes through the
per-module path (the GEMV entries decline several rows), the decode token through
norm-in-GEMV, SiLU-in-GEMV and rotary-with-store; the decode output, the residual stream
and the KV cache must equal the plain run's, also with a residual multiplier (Granite's),
which the layer applies between the fused kernels.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_llama_config, use_triton_plugins

use_triton_plugins("kernels/triton/src", "plugins/attention_torch/src")

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec  # noqa: E402
from tessellm.interfaces.model import ModelContext, ParallelInfo  # noqa: E402
from tessellm.interfaces.ops import FusedOps, bind_fused_ops  # noqa: E402
from tessellm.layers.attention import Attention  # noqa: E402
from tessellm.layers.decoder import (  # noqa: E402
    DecoderAttention,
    DecoderLayer,
    DecoderModel,
    GatedMLP,
)
from tessellm_attention_torch.backend import TorchPagedAttention  # noqa: E402
from tessellm_triton_kernels.dense_gemv import UnquantizedGemv  # noqa: E402
from tessellm_triton_kernels.gemv import GemvConfig  # noqa: E402
from tessellm_triton_kernels.linear_ops import LinearFusions  # noqa: E402
from tessellm_triton_kernels.norm_gemv import PersistentGemvConfig  # noqa: E402
from tessellm_triton_kernels.ops import triton_fused_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK = 16
SMALL = GemvConfig(block_n=8, block_k=64, num_warps=4)
# Few programs, so each walks several row blocks of the persistent kernel.
FUSIONS = LinearFusions(*(PersistentGemvConfig(2, num_warps=4, programs_per_sm=1),) * 2)


def _counting(table: FusedOps, calls: Counter) -> FusedOps:
    """The table with each entry counting the calls it did not decline."""

    def wrap(name, fn):
        def counted(*args):
            out = fn(*args)
            calls[name] += out is not None
            return out

        return counted

    return FusedOps(**{name: wrap(name, getattr(table, name)) for name in table.names()})


def _model(config, seed: int, residual_multiplier: float | None = None) -> DecoderModel:
    spec = AttentionSpec(DEVICE, torch.float32, 16, 4, 2, BLOCK)
    quant = UnquantizedGemv(SMALL, device_types=(DEVICE,), dtypes=(torch.float32,))
    ctx = ModelContext(
        torch.float32, torch.device(DEVICE), TorchPagedAttention(spec), quant, ParallelInfo()
    )

    def layer(i: int) -> DecoderLayer:
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, ctx)
        attention = DecoderAttention(config, ctx)
        return DecoderLayer(config, ctx, attention, mlp, residual_multiplier=residual_multiplier)

    model = DecoderModel(config, ctx, layer).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    for m in model.modules():
        if isinstance(m, Attention):
            m.bind_kv_cache(*(torch.zeros(4, BLOCK, 2, 16, device=DEVICE) for _ in "kv"))
    return model


def _metadata(start: int, tokens: int) -> AttentionMetadata:
    qsl = torch.tensor([0, tokens], dtype=torch.int32)
    lens = torch.tensor([start + tokens], dtype=torch.int32)
    return AttentionMetadata(
        query_start_loc=qsl.to(DEVICE),
        seq_lens=lens.to(DEVICE),
        block_tables=torch.arange(4, dtype=torch.int32, device=DEVICE)[None, :],
        slot_mapping=torch.arange(start, start + tokens, device=DEVICE),
        max_query_len=tokens,
        max_seq_len=start + tokens,
        query_start_loc_cpu=qsl,
        seq_lens_cpu=lens,
    )


def _caches(model: DecoderModel) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, Attention) for t in (m.k_cache, m.v_cache)]


@pytest.mark.parametrize("residual_multiplier", [None, 0.35])
@torch.inference_mode()
def test_decode_step_with_every_fused_entry_equals_the_plain_layers(residual_multiplier):
    config = tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    ids = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    calls: Counter = Counter()
    table = _counting(triton_fused_ops(fusions=FUSIONS), calls)
    outputs = []
    for ops in (None, table):
        model = _model(config, seed=1, residual_multiplier=residual_multiplier)
        assert bind_fused_ops(model, ops) > 0
        model(ids[:5], torch.arange(5, device=DEVICE), _metadata(0, 5))  # prompt
        prompt_calls = Counter(calls)
        hidden = model(ids[5:], torch.tensor([5], device=DEVICE), _metadata(5, 1))  # decode
        outputs.append((hidden, *_caches(model)))
    # The prompt's rows go module by module; the decode token through the fused kernels:
    # per layer two norm-GEMVs, the second with the SiLU, and one rotary with the store.
    assert prompt_calls["rms_norm_linear"] == 0 and prompt_calls["rotary_neox_write_kv"] == 2
    assert calls["rms_norm_linear"] == 4 and calls["rotary_neox_write_kv"] == 4
    assert calls["linear_silu_and_mul"] == 0  # folded into the norm-GEMV instead
    for plain, fused in zip(outputs[0], outputs[1], strict=True):
        torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-5)


@torch.inference_mode()
def test_silu_epilogue_alone_serves_the_mlp():
    config = tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=1)
    model = _model(config, seed=2)
    mlp = model.layers[0].mlp
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    plain = mlp(x)
    calls: Counter = Counter()
    bind_fused_ops(model, _counting(triton_fused_ops(["linear_silu_and_mul"], FUSIONS), calls))
    torch.testing.assert_close(mlp(x), plain, atol=1e-5, rtol=1e-5)
    assert calls["linear_silu_and_mul"] == 1
