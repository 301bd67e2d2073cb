"""fp8 on a GPU of compute capability >= 8.9 (H100): the ``torch._scaled_mm`` path against
the float32 W8A8 emulation (the same fp8 operands, bit for bit, so only float32 summation
order and the output's rounding differ: the bound is derived in ``quant_fp8_gemm_cases``,
and ``test_fp8_scaled_mm_cpu.py`` runs the same cases through the CPU's ``_scaled_mm``),
the conformance kit on CUDA, and the engine with CUDA graphs. Skipped without such a GPU."""

from __future__ import annotations

import pytest
import torch
from quant_fp8_checkpoints import write_fp8_checkpoint
from quant_fp8_gemm_cases import (
    DYNAMIC,
    ROWS,
    SHAPES,
    STATIC,
    STATIC_INPUT_SCALE,
    assert_within_one_output_ulp,
    case_activations,
    case_row_bounds,
    case_weights,
    emulate,
    fp8_layer,
    row_bounds,
    row_errors,
    unit_roundoff,
)

from tessellm import LLM, SamplingParams
from tessellm.testing import check_quantization_method, tiny_model
from tessellm_quant_fp8.fp8 import (
    quantize_activations,
    quantize_weight_per_channel,
    reference_linear,
)
from tessellm_quant_fp8.method import Fp8Method

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
        reason="needs a CUDA device of compute capability >= 8.9",
    ),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantizers_round_the_same_bits_on_the_gpu_and_the_cpu(dtype):
    # The cause of the first failures: `amax / 448` is a true division on the CPU and a
    # product with fl32(1/448) on CUDA, and bf16 rows often put x / scale exactly on an
    # e4m3 midpoint, which that ulp tipped apart in ~2% of the rows.
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4096, 48, generator=g) * 2.0 ** (torch.arange(4096) % 7 - 3)[:, None]).to(
        dtype
    )
    for cpu, gpu in (
        (quantize_activations(x), quantize_activations(x.cuda())),
        (quantize_weight_per_channel(x), quantize_weight_per_channel(x.cuda())),
    ):
        assert torch.equal(cpu[0].view(torch.uint8), gpu[0].cpu().view(torch.uint8))
        assert torch.equal(cpu[1], gpu[1].cpu())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", [DYNAMIC, STATIC], ids=["dynamic", "static"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scaled_mm_equals_the_emulation(dtype, config, shape):
    k, n = shape
    g, q, scale, bias = case_weights(k, n, dtype)
    input_scale = torch.tensor(STATIC_INPUT_SCALE) if config is STATIC else None
    layer = fp8_layer(config, q, scale, bias, input_scale, dtype, "cuda")
    assert layer.fp8_kernel == "scaled_mm"
    out_dtype = layer.fp8_out_dtype
    for m in ROWS:
        x = case_activations(g, m, k, dtype)
        y = layer(x.cuda())
        assert y.shape == (m, n) and y.dtype == dtype
        if m == 1:  # the weight-only GEMV: no activation rounding, float32 FMAs, run dtype
            unbiased = reference_linear(x.float(), q, scale.reshape(-1), None)
            magnitude = reference_linear(x.float().abs(), q.float().abs(), scale.reshape(-1), None)
            sum_error = (2 * k + 1) * unit_roundoff(torch.float32) * magnitude
            ref = unbiased + bias.float()
            bounds = row_bounds(unbiased, ref, sum_error, dtype, dtype)
            assert bool((row_errors(y, ref) <= bounds).all())
            continue
        em = emulate(x, q, scale, bias, input_scale, out_dtype)
        errors, bounds = row_errors(y, em.ref), case_row_bounds(em, out_dtype, dtype)
        assert bool((errors <= bounds).all()), (m, out_dtype, errors.max(), bounds.min())
        assert_within_one_output_ulp(y, em, out_dtype, dtype)
        if config is DYNAMIC:  # the data would show a per-token scale on the wrong row
            x_scale = quantize_activations(x)[1]
            wrong = em.unbiased * x_scale.roll(1, dims=0) / x_scale + bias.float()
            assert float((row_errors(y, wrong) / bounds).max()) > 10


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

    def run(sequences=None, **kwargs):
        llm = LLM(str(tmp_path / "fp8"), dtype="float32", gpu_memory_utilization=0.3, **kwargs)
        if sequences is None:
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
            (m.fp8_kernel, m.fp8_out_dtype)
            for m in llm.engine.executor.runner.model.modules()
            if hasattr(m, "fp8_kernel")
        }
        del llm
        torch.cuda.empty_cache()
        return sequences, logprobs, kernels

    eager_sequences, eager_logprobs, kernels = run(enforce_eager=True)
    assert {kernel for kernel, _ in kernels} == {"scaled_mm"}
    graph_sequences, graph_logprobs, _ = run()
    assert graph_sequences == eager_sequences
    torch.testing.assert_close(graph_logprobs, eager_logprobs, rtol=0, atol=1e-3)
    monkeypatch.setattr(Fp8Method, "_kernel_for", lambda self, device: "emulate")
    # Scored along the _scaled_mm run's own sequences (each run's greedy tokens may part:
    # one row decodes weight-only through the GEMV, the emulation rounds activations), and
    # with the output rounded to the dtype _scaled_mm writes (bf16 for a float32 model
    # where the row-wise kernel writes no float32): what is left is summation order. The
    # CPU mirror of this test measures 1.3e-6; an emulation keeping float32 outputs is
    # 0.055 apart, and one scale 25% off in one layer 0.058 (test_fp8_engine.py), so 0.005
    # keeps a tenfold margin on both sides of what it must tell apart.
    _, emulated_logprobs, emulated_kernels = run(eager_sequences, enforce_eager=True)
    assert emulated_kernels == {("emulate", out_dtype) for _, out_dtype in kernels}
    gap = float((eager_logprobs - emulated_logprobs).abs().mean())
    assert gap <= 0.005, (gap, kernels)
