"""fp8 on a GPU of compute capability >= 8.9 (H100): the ``torch._scaled_mm`` path against
the float32 W8A8 emulation (the same fp8 operands, so only float32 summation order and the
output's rounding differ), the conformance kit on CUDA, and the engine with CUDA graphs.
Skipped without such a GPU."""

from __future__ import annotations

import pytest
import torch
from quant_fp8_checkpoints import fp8_per_channel, write_fp8_checkpoint

from tessellm import LLM, SamplingParams
from tessellm.testing import check_quantization_method, tiny_model
from tessellm_quant_fp8.fp8 import emulated_linear, reference_linear
from tessellm_quant_fp8.method import Fp8Method

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA device of compute capability >= 8.9",
    ),
]

DYNAMIC = {"quant_method": "fp8", "activation_scheme": "dynamic"}
STATIC = {"quant_method": "fp8", "activation_scheme": "static"}
# A row of _scaled_mm's output against the emulation: bf16 output rounding (2^-9) and
# float32 summation order; a layout or scale mistake is of order 1.
ROW_TOL = 1e-2


def fp8_layer(config, q, scale, bias, input_scale, dtype):
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.layers.linear import ColumnParallelLinear

    method = Fp8Method.from_config(config)
    ctx = ModelContext(dtype, torch.device("cuda"), None, method, ParallelInfo())
    with torch.device("cuda"):
        layer = ColumnParallelLinear(q.shape[1], q.shape[0], ctx, bias=bias is not None)
    layer.weight_loader(layer.weight, q.cuda())
    layer.weight_loader(layer.weight_scale, scale.cuda())
    if bias is not None:
        layer.weight_loader(layer.bias, bias.cuda())
    if input_scale is not None:
        layer.weight_loader(layer.input_scale, input_scale.cuda())
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", [DYNAMIC, STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("shape", [(64, 48), (40, 24), (4096, 1024)], ids=str)
def test_scaled_mm_equals_the_emulation(dtype, config, shape):
    k, n = shape
    g = torch.Generator().manual_seed(0)
    q, scale = fp8_per_channel(torch.randn(n, k, generator=g))
    bias = (torch.randn(n, generator=g) * 0.1).to(dtype)
    input_scale = torch.tensor(0.01) if config is STATIC else None
    layer = fp8_layer(config, q, scale, bias, input_scale, dtype)
    assert layer.fp8_kernel == "scaled_mm"
    for m in (1, 7, 64):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = layer(x.cuda()).float().cpu()
        if m == 1:  # one row: the weight-only GEMV, no activation rounding
            ref = reference_linear(x.float(), q, scale.reshape(-1), bias.float())
        else:
            ref = emulated_linear(x.float(), q, scale.reshape(-1), bias.float(), input_scale)
        assert y.shape == (m, n)
        err = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max()
        assert float(err) <= ROW_TOL, (m, float(err))


@pytest.mark.parametrize("config", [None, DYNAMIC, STATIC], ids=["online", "dynamic", "static"])
def test_conforms_on_cuda(config):
    result = check_quantization_method("fp8", quant_config=config)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert all(case.startswith("[cuda") for case in result.checked)


def test_engine_scaled_mm_matches_the_emulation_with_and_without_graphs(tmp_path, monkeypatch):
    # Head size 32, which the Triton attention backend serves.
    dense = tiny_model(
        "LlamaForCausalLM", tmp_path / "dense", hidden_size=128, intermediate_size=256
    )
    write_fp8_checkpoint(dense, tmp_path / "fp8", tmp_path / "dequantized", per_channel=False)
    prompts = [[1, 5, 6, 7], [1, 9, 30, 31, 40], [1, 100, 101]]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)

    def run(**kwargs):
        llm = LLM(str(tmp_path / "fp8"), dtype="float32", gpu_memory_utilization=0.3, **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        sequences = [p + t for p, t in zip(prompts, tokens, strict=True)]
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params)
        logprobs = torch.tensor(
            [
                o.prompt_logprobs[i][s[i]].logprob
                for o, s in zip(outs, sequences, strict=True)
                for i in range(1, len(s))
            ]
        )
        kernels = {
            m.fp8_kernel
            for m in llm.engine.executor.runner.model.modules()
            if hasattr(m, "fp8_kernel")
        }
        del llm
        torch.cuda.empty_cache()
        return tokens, logprobs, kernels

    eager_tokens, eager_logprobs, kernels = run(enforce_eager=True)
    assert kernels == {"scaled_mm"}
    graph_tokens, graph_logprobs, _ = run()
    assert graph_tokens == eager_tokens
    torch.testing.assert_close(graph_logprobs, eager_logprobs, rtol=0, atol=1e-3)
    monkeypatch.setattr(Fp8Method, "_kernel_for", lambda self, device: "emulate")
    _, emulated_logprobs, kernels = run(enforce_eager=True)
    assert kernels == {"emulate"}
    # Along the same sequences: the GPU's W8A8 is the emulation's, up to output rounding
    # (bf16 where this torch's row-wise kernel writes no float32) and summation order.
    assert float((eager_logprobs - emulated_logprobs).abs().mean()) <= 0.02
