"""The engine with fp8: a tiny Llama saved as an fp8 checkpoint (written by plain torch)
against the dense model of its dequantized weights, on the CPU in float32; online
quantization of the dense checkpoint.

Tolerances. The CPU runs fp8 weight-only (``x @ q.T * s``), the same arithmetic as the
dequantized dense model up to float32 rounding: greedy tokens are equal and each prompt
token's logprob within 1e-4. With the GPU's activation rounding emulated (W8A8), tokens
may differ: over these prompts the mean |logprob difference| along the dense model's own
greedy continuations was 0.029 (max 0.12, argmax agreement 88%), so the bound is 0.04,
which one per-tensor scale off by 25% in a single layer (0.058) already breaks."""

from __future__ import annotations

import shutil

import pytest
import torch
from quant_fp8_checkpoints import write_fp8_checkpoint
from safetensors.torch import load_file, save_file

from tessellm import LLM, SamplingParams
from tessellm.testing import tiny_model
from tessellm_quant_fp8.method import Fp8Method

PROMPTS = [[1, 5, 6, 7], [1, 9, 30, 31, 40], [1, 100, 101], [1, 17, 18, 19, 20, 21]]
NEW_TOKENS = 24
EXACT_LOGPROB_TOL = 1e-4
W8A8_MEAN_LOGPROB_TOL = 0.04
LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-engine")
    dense = tiny_model("LlamaForCausalLM", root / "dense")
    paths = {"dense": dense}
    for name, per_channel, scheme in (
        ("per-tensor", False, "dynamic"),
        ("per-channel-static", True, "static"),
    ):
        paths[name], paths[name + "-dequantized"] = root / name, root / (name + "-dequantized")
        write_fp8_checkpoint(
            dense,
            paths[name],
            paths[name + "-dequantized"],
            per_channel=per_channel,
            activation_scheme=scheme,
        )
    # A scale bug: one layer's down_proj scale 25% too large.
    paths["scale-bug"] = root / "scale-bug"
    shutil.copytree(paths["per-tensor"], paths["scale-bug"])
    tensors = load_file(paths["scale-bug"] / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight_scale"] *= 1.25
    save_file(tensors, paths["scale-bug"] / "model.safetensors")
    return paths


def engine(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", enforce_eager=True, **kwargs)


def greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    return [list(o.outputs[0].token_ids) for o in outs]


def token_logprobs(llm: LLM, sequences: list[list[int]]) -> torch.Tensor:
    """Each token's logprob given the ones before it (teacher-forced), all sequences."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params)
    return torch.tensor(
        [
            out.prompt_logprobs[i][seq[i]].logprob
            for out, seq in zip(outs, sequences, strict=True)
            for i in range(1, len(seq))
        ]
    )


def reference(path) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """The dense model's greedy tokens, prompts + continuations, and their logprobs."""
    llm = engine(path)
    tokens = greedy(llm)
    sequences = [p + t for p, t in zip(PROMPTS, tokens, strict=True)]
    return tokens, sequences, token_logprobs(llm, sequences)


def assert_linears_are_fp8(llm: LLM) -> None:
    runner = llm.engine.executor.runner
    assert runner.quantization == "fp8"
    weights = {n: p for n, p in runner.model.named_parameters() if n.endswith("proj.weight")}
    assert len(weights) == 3 * len(LINEAR_NAMES)  # every linear of the 3 layers
    assert all(p.dtype == torch.float8_e4m3fn for p in weights.values()), weights


@pytest.mark.parametrize("checkpoint", ["per-tensor", "per-channel-static"])
def test_fp8_checkpoint_equals_its_dequantized_dense_model(models, checkpoint):
    tokens, sequences, expected = reference(models[checkpoint + "-dequantized"])
    llm = engine(models[checkpoint])  # chosen by the checkpoint's quant_method
    assert_linears_are_fp8(llm)
    assert greedy(llm) == tokens
    got = token_logprobs(llm, sequences)
    assert float((got - expected).abs().max()) <= EXACT_LOGPROB_TOL


def test_w8a8_activation_rounding_stays_within_the_stated_tolerance(models, monkeypatch):
    _, sequences, expected = reference(models["per-tensor-dequantized"])
    monkeypatch.setattr(Fp8Method, "default_off_gpu_kernel", "emulate")
    errors = {}
    for name in ("per-tensor", "scale-bug"):
        llm = engine(models[name])
        kernels = {
            m.fp8_kernel
            for m in llm.engine.executor.runner.model.modules()
            if hasattr(m, "fp8_kernel")
        }
        assert kernels == {"emulate"}
        errors[name] = (token_logprobs(llm, sequences) - expected).abs()
    assert float(errors["per-tensor"].mean()) <= W8A8_MEAN_LOGPROB_TOL
    assert float(errors["per-tensor"].max()) <= 0.2
    assert float(errors["scale-bug"].mean()) > W8A8_MEAN_LOGPROB_TOL


def test_online_quantization_equals_the_per_channel_checkpoint(models):
    # The online quantizer is the per-channel one the checkpoint was written with, so its
    # dense dequantized model is the reference.
    tokens, sequences, expected = reference(models["per-channel-static-dequantized"])
    llm = engine(models["dense"], quantization="fp8")
    assert_linears_are_fp8(llm)
    assert greedy(llm) == tokens
    got = token_logprobs(llm, sequences)
    assert float((got - expected).abs().max()) <= EXACT_LOGPROB_TOL


def test_a_checkpoint_without_one_shards_scale_names_the_layer(models, tmp_path):
    from tessellm.errors import ModelLoadError

    broken = tmp_path / "no-k-scale"
    shutil.copytree(models["per-tensor"], broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight_scale"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"^model\.layers\.0\.self_attn\.qkv_proj: fp8: "):
        engine(broken)
