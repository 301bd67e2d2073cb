"""A tiny Llama saved as a GPTQ or AWQ checkpoint loads in tessellm (fp32, CPU), chosen
by its ``quant_method``, with weights kept 4-bit, and greedy-decodes the tokens of the
dense model built from the same dequantized weights."""

from __future__ import annotations

import pytest
import torch
from quant_int4_reference import write_quantized_llama

from tessellm import LLM, SamplingParams
from tessellm.testing import TEST_PROMPTS, tiny_model
from tessellm_quant_int4.int4_groups import cpu_kernel_fast

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("dense-llama"))


@pytest.fixture(autouse=True)
def eager_decode(monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")  # the eager step, no background build


def greedy(path, **kwargs):
    llm = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(TEST_PROMPTS[:3], params)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    ("fmt", "group_size", "sym", "act_order"),
    [
        ("gptq", 32, True, False),
        ("gptq", 32, False, True),  # asymmetric, act-order
        ("gptq", -1, True, True),  # act-order over one group: no reordering
        ("gptq", 64, False, False),
        ("awq", 32, False, False),
    ],
)
def test_quantized_checkpoint_decodes_like_its_dequantized_model(
    dense_llama, tmp_path, fmt, group_size, sym, act_order
):
    path = write_quantized_llama(dense_llama, tmp_path / fmt, fmt, group_size, sym, act_order)
    llm, tokens = greedy(path)
    runner = llm.engine.executor.runner
    assert runner.quantization == fmt
    linears = [m for m in runner.model.modules() if hasattr(m, "int4_path")]
    assert len(linears) == 4 * 3  # qkv, o, gate_up, down in each of 3 layers
    expected = "cpu" if cpu_kernel_fast(torch.float32) else "dequantize"  # x86: dequantize
    assert {m.int4_path for m in linears} == {expected}
    assert not any(name.endswith(("qweight", "weight")) for name, _ in _linear_params(linears))
    if act_order and group_size != -1:
        assert all(m.int4_perm is not None for m in linears)
    _, dense_tokens = greedy(path / "dense")
    assert tokens == dense_tokens
    assert all(len(t) == NEW_TOKENS for t in tokens)


def _linear_params(linears):
    for module in linears:
        yield from module.named_parameters(recurse=False)


def test_unsupported_checkpoint_config_fails_the_load_with_the_reason(dense_llama, tmp_path):
    import json

    from tessellm.errors import ConfigError

    path = write_quantized_llama(dense_llama, tmp_path / "gptq", "gptq", 32)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["bits"] = 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="8-bit"):
        LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128)


def test_weights_stay_four_bit_in_memory(dense_llama, tmp_path):
    path = write_quantized_llama(dense_llama, tmp_path / "awq", "awq", 32)
    quantized = LLM(model=str(path), dtype="float32", device="cpu", max_model_len=128)
    linears = [
        m for m in quantized.engine.executor.runner.model.modules() if hasattr(m, "int4_path")
    ]
    held = sum(b.numel() * b.element_size() for m in linears for b in m.buffers(recurse=False))
    dense = sum(m.in_features * m.out_features * 4 for m in linears)
    # 4 bits a weight plus two fp32 values per group of 32: 1/8 + 1/16 of fp32's bytes.
    assert held <= dense * (1 / 8 + 1 / 16) + 1024
    assert torch.get_default_dtype() == torch.float32


def test_bf16_runs_on_the_int4_kernel_within_the_dense_models_top5(dense_llama, tmp_path):
    """bf16 (the int4 kernel's vectorized dtype): greedy tokens may differ from fp32 once
    two candidates are close, so each must be among the dequantized fp32 model's five
    most likely, teacher-forced on tessellm's sequence (HF transformers)."""
    from transformers import AutoModelForCausalLM

    path = write_quantized_llama(dense_llama, tmp_path / "gptq", "gptq", 32, False, True)
    llm = LLM(model=str(path), dtype="bfloat16", device="cpu", max_model_len=128)
    linears = [m for m in llm.engine.executor.runner.model.modules() if hasattr(m, "int4_path")]
    assert {m.int4_path for m in linears} == {"cpu"}
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in TEST_PROMPTS[:3]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    hf = AutoModelForCausalLM.from_pretrained(path / "dense", dtype=torch.float32).eval()
    for prompt, out in zip(prompts, outs, strict=True):
        generated = list(out.outputs[0].token_ids)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
        top5 = logits.topk(5, dim=-1).indices
        assert all(t in top5[i].tolist() for i, t in enumerate(generated)), generated
