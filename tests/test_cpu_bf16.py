"""The CPU platform in bf16: tokens stay within HF's top-5, and 4-bit weights stay 4-bit.

In bf16 greedy tokens may differ from the fp32 reference once two candidates are close,
so the check is the weaker one the issue asks for: every token tessellm generates is among
HF fp32's five most likely next tokens, given the same prefix (HF scores tessellm's whole
sequence in one teacher-forced pass).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_PROMPTS, save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams
from tessellm_quant_int4.cpu_int4 import GROUP_SIZE, PACKED_MAX_ROWS, pack_int4
from tessellm_quant_int4.woq import WeightOnlyInt4, packed_layer_count

NEW_TOKENS = 24


def snap_to_4bit_grid(path) -> None:
    """Rewrite the checkpoint's weights as a GGUF file holds them: linears in Q4_1 (4-bit
    min/max groups of 32), the LM head in Q8_0 (8-bit symmetric groups of 32)."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(file)
    for name, t in tensors.items():
        if name == "lm_head.weight":
            groups = t.view(t.shape[0], -1, GROUP_SIZE)
            step = groups.abs().amax(-1, keepdim=True) / 127
            tensors[name] = ((groups / step).round() * step).view_as(t).contiguous()
        elif t.dim() == 2 and "embed" not in name:
            groups = t.view(t.shape[0], -1, GROUP_SIZE)
            low = groups.amin(-1, keepdim=True)
            step = (groups.amax(-1, keepdim=True) - low) / 15
            q = ((groups - low) / step).round()
            tensors[name] = (q * step + low).view_as(t).contiguous()
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def grid_llama(tmp_path_factory):
    path = save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("grid-llama"))
    snap_to_4bit_grid(path)
    return path


def hf_top5_misses(path, prompt_ids: list[int], generated: list[int]) -> list[int]:
    """Positions where ``generated`` leaves HF fp32's top-5 (teacher-forced)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    top5 = logits.topk(5, dim=-1).indices
    return [i for i, tok in enumerate(generated) if tok not in top5[i].tolist()]


def generate_bf16(path, **kwargs):
    llm = LLM(model=str(path), dtype="bfloat16", device="cpu", **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in TEST_PROMPTS[:4]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    return llm, prompts, [o.outputs[0].token_ids for o in outs]


def test_bf16_tokens_within_hf_top5(tiny_llama):
    llm, prompts, generated = generate_bf16(tiny_llama)
    assert llm.engine.describe()["dtype"] == "bfloat16"
    for prompt, tokens in zip(prompts, generated, strict=True):
        assert len(tokens) == NEW_TOKENS
        assert hf_top5_misses(tiny_llama, prompt, tokens) == []


def test_weights_on_a_4bit_grid_are_packed_and_stay_within_top5(grid_llama, tiny_llama):
    llm, prompts, generated = generate_bf16(grid_llama)
    runner = llm.engine.executor.runner
    assert runner.quantization == "woq_grid"
    packed, total = packed_layer_count(runner.model)
    assert packed == total > 0
    assert runner.model.lm_head.logits_matmul is not None
    for prompt, tokens in zip(prompts, generated, strict=True):
        assert hf_top5_misses(grid_llama, prompt, tokens) == []
    # Weights that are not on a grid are left dense.
    dense = LLM(model=str(tiny_llama), dtype="bfloat16", device="cpu").engine.executor.runner
    assert packed_layer_count(dense.model)[0] == 0
    assert dense.model.lm_head.logits_matmul is None


def test_pack_int4_recovers_grid_weights_exactly():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (48, 64), generator=g).float()
    q[:, 0::GROUP_SIZE], q[:, 1::GROUP_SIZE] = 0, 15  # every group spans the full range
    scale = torch.rand(48, 64 // GROUP_SIZE, 1, generator=g) * 0.1 + 0.01
    low = torch.randn(48, 64 // GROUP_SIZE, 1, generator=g) * 0.1
    weight = (q.view(48, -1, GROUP_SIZE) * scale + low).view(48, 64)
    packed, scales_zeros = pack_int4(weight, grid_only=True)
    x = torch.randn(3, 64, generator=g)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_zeros)
    torch.testing.assert_close(out, x @ weight.t(), atol=1e-5, rtol=1e-5)
    off_grid = weight + torch.randn(weight.shape, generator=g) * 0.01
    assert pack_int4(off_grid, grid_only=True) is None
    assert pack_int4(off_grid, grid_only=False) is not None


def test_lossy_method_packs_everything_and_picks_the_kernel_by_rows_dtype_and_cpu():
    from torch import nn

    layer = nn.Module()
    method = WeightOnlyInt4()
    method.create_weights(layer, 64, 32, torch.bfloat16)
    layer.weight.data.normal_(0, 0.05)
    method.process_weights_after_loading(layer)
    assert layer.woq_packed is not None
    small = torch.randn(2, 64, dtype=torch.bfloat16)
    big = torch.randn(64, 64, dtype=torch.bfloat16)
    dense_small = small.float() @ layer.weight.float().t()
    err = (method.apply(layer, small, None).float() - dense_small).abs().max()
    assert 0 < err < 0.1  # 4-bit rounding: close to the dense product, not equal
    dense_big = nn.functional.linear(big, layer.weight)
    if PACKED_MAX_ROWS[torch.bfloat16] < 64:  # AVX-512: the dense kernels for big batches
        assert torch.equal(method.apply(layer, big, None), dense_big)
    else:  # emulated bf16 GEMMs: the packed weight at every size
        err = (method.apply(layer, big, None).float() - dense_big.float()).abs().max()
        assert 0 < err < 0.25  # 4-bit rounding over 64 rows: the largest of more errors
    assert PACKED_MAX_ROWS[torch.float32] == 16  # fp32 GEMMs are fast on any x86 CPU


def test_int8_group_head_computes_the_grid_weights():
    from tessellm_quant_int4.cpu_int4 import Int8GroupLogitsMatmul, pack_int8_groups

    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (48, 64), generator=g).float()
    q[:, 0::GROUP_SIZE] = 127  # Q8_0: the group's largest magnitude is 127 steps
    step = torch.rand(48, 64 // GROUP_SIZE, 1, generator=g) * 0.01 + 0.001
    weight = (q.view(48, -1, GROUP_SIZE) * step).view(48, 64)
    head = Int8GroupLogitsMatmul(weight, pack_int8_groups(weight, grid_only=True))
    x = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(head(x), x @ weight.t(), atol=1e-4, rtol=1e-4)
    assert torch.equal(head(torch.ones(40, 64)), torch.ones(40, 64) @ weight.t())  # dense
    assert pack_int8_groups(weight[:40], grid_only=False) is None  # N not a multiple of 16
    off_grid = weight + torch.randn(weight.shape, generator=g) * 1e-3
    assert pack_int8_groups(off_grid, grid_only=True) is None
