"""A tiny Llama written as a GGUF file (``gguf``'s writer and quantizer) loads with its
weights kept quantized and generates the same greedy tokens as the same file loaded
dense (``quantization="none"``: every tensor dequantized by the ``gguf`` package).

The file mixes types inside fused layers (q/k Q4_0 with v Q8_0; gate Q5_0 with up
Q5_1), keeps one query matrix in F16 (a dense matrix inside a quantized fused layer) and
has Q4_1 and Q8_0 elsewhere. In fp32 the per-call dequantize path builds the same fp32
weights as the dense load, so tokens must be equal; the int4 kernel path (forced in
fp32) computes the same sums in another order (fp32 rounding, ~1e-6 relative), and the
file's wide weights keep greedy choices far apart, so tokens must be equal too. In bf16
(the kernel, bf16 scales) against dense bf16, 95% of tokens must agree.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from gguf import dequantize
from gguf_test_files import QT, write_tiny_llama

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError
from tessellm.interfaces.model import ParallelInfo
from tessellm.testing import TEST_PROMPTS, check_quantization_method
from tessellm_gguf import native_weights, runtime
from tessellm_gguf.format import GGUFFormat
from tessellm_gguf.method import GGUFNative, describe_layer
from tessellm_gguf.tensor_table import map_file, read_tensor_table

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per test
torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", "1")))

TYPES = {
    "attn_q": QT.Q4_0,
    "attn_k": QT.Q4_0,
    "attn_v": QT.Q8_0,
    "blk.1.attn_q": QT.F16,
    "attn_output": QT.Q4_1,
    "ffn_gate": QT.Q5_0,
    "ffn_up": QT.Q5_1,
    "ffn_down": QT.Q8_0,
    "token_embd": QT.Q8_0,
    "output": QT.Q8_0,
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", TYPES)


@pytest.fixture(autouse=True)
def _cache(tessellm_cache_dir):
    """Conversions of the dense path go to a fresh cache per test."""


def _greedy(path, dtype: str, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(model=str(path), dtype=dtype, device="cpu", **kwargs)
    outputs = llm.generate(TEST_PROMPTS[:4], GREEDY)
    return [list(o.outputs[0].token_ids) for o in outputs], llm


def test_config_selects_the_gguf_method(tiny_gguf):
    config = GGUFFormat().load_config(tiny_gguf)
    assert config.quantization_config == {"quant_method": "gguf"}
    assert native_weights.supports_native(config)


def test_native_tensors_are_the_file_blocks_under_hf_names(tiny_gguf):
    """Raw blocks (Q/K rows un-permuted as transformers does) dequantize to exactly the
    dense path's tensors; the F16 matrix comes as F32 rows; the rest is dense."""
    fmt = GGUFFormat()
    config = fmt.load_config(tiny_gguf)
    native = dict(fmt.iter_weights(tiny_gguf, config, torch.float32))
    config.quantization_config = None
    dense = dict(fmt.iter_weights(tiny_gguf, config, torch.float32))
    prefix = "model.layers.0.self_attn.q_proj"
    assert int(native[f"{prefix}.qweight_type"]) == QT.Q4_0
    blocks = native[f"{prefix}.qweight"]
    assert blocks.dtype == torch.uint8 and blocks.shape == (64, 2 * 18)
    unpacked = torch.from_numpy(dequantize(blocks.numpy(), QT.Q4_0).copy())
    assert torch.equal(unpacked, dense[f"{prefix}.weight"])
    # The permutation matters: the file's own row order does not match.
    table = read_tensor_table(tiny_gguf)
    entry = next(e for e in table.tensors if e.name == "blk.0.attn_q.weight")
    assert not torch.equal(
        blocks, torch.from_numpy(np.array(table.raw(map_file(tiny_gguf), entry)))
    )
    f16 = "model.layers.1.self_attn.q_proj"
    assert int(native[f"{f16}.qweight_type"]) == QT.F32
    rows = native[f"{f16}.qweight"].view(torch.float32).view(64, 64)
    assert torch.equal(rows, dense[f"{f16}.weight"])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(native[name], dense[name])
    linear_weights = [n for n in dense if n.endswith("proj.weight")]
    assert len(linear_weights) == 3 * 7 and not any(n in native for n in linear_weights)


def test_fast_name_map_equals_transformers(tiny_gguf):
    from transformers.modeling_gguf_pytorch_utils import (
        LlamaTensorProcessor,
        get_gguf_hf_weights_map,
    )

    config = GGUFFormat().load_config(tiny_gguf)
    skeleton = native_weights._skeleton(config)
    processor = LlamaTensorProcessor(config=config.to_dict())
    names = [e.name for e in read_tensor_table(tiny_gguf).tensors]
    fast = native_weights.gguf_to_hf_names(skeleton, processor, "llama", 3, names)
    full = get_gguf_hf_weights_map(skeleton, processor)
    assert {n: fast[n] for n in names} == {n: full[n] for n in names}


def test_tensor_table_matches_gguf_reader(tiny_gguf):
    from gguf import GGUFReader

    table = read_tensor_table(tiny_gguf)
    data = map_file(tiny_gguf)
    reader = GGUFReader(tiny_gguf)
    assert table.architecture == "llama"
    assert [e.name for e in table.tensors] == [t.name for t in reader.tensors]
    for entry, tensor in zip(table.tensors, reader.tensors, strict=True):
        assert entry.qtype == tensor.tensor_type
        ours = np.asarray(table.raw(data, entry)).view(np.uint8).ravel()
        assert np.array_equal(ours, np.asarray(tensor.data).view(np.uint8).ravel())


def test_greedy_tokens_equal_the_dense_load_fp32(tiny_gguf, monkeypatch):
    dense, _ = _greedy(tiny_gguf, "float32", quantization="none")
    unasked, llm = _greedy(tiny_gguf, "float32")  # in fp32 the dense model is faster
    assert llm.engine.executor.runner.quantization == "none" and unasked == dense
    del llm
    native, llm = _greedy(tiny_gguf, "float32", quantization="gguf")
    runner = llm.engine.executor.runner
    assert runner.quantization == "gguf"
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    # q, k (Q4_0: codes two per byte) and v (Q8_0: a byte each) dequantized per call.
    assert not hasattr(qkv, "weight") and describe_layer(qkv) == "DequantSegment, DequantSegment"
    assert native == dense
    del llm
    # The int4 kernel's repacking, in fp32.
    monkeypatch.setattr(runtime, "INT4_KERNEL_DTYPES", (torch.float32, torch.bfloat16))
    kernel, llm = _greedy(tiny_gguf, "float32", quantization="gguf")
    layers = llm.engine.executor.runner.model.model.layers
    assert describe_layer(layers[0].self_attn.qkv_proj) == "Int4KernelSegment, Int4KernelSegment"
    # Layer 1's query matrix is F16 in the file: a dense segment before k (one half) and
    # v (two halves).
    kinds = "DenseSegment, Int4KernelSegment, Int4KernelSegment"
    assert describe_layer(layers[1].self_attn.qkv_proj) == kinds
    assert kernel == dense


def test_bf16_kernel_path_agrees_with_dense_bf16(tiny_gguf):
    dense, _ = _greedy(tiny_gguf, "bfloat16", quantization="none")
    native, llm = _greedy(tiny_gguf, "bfloat16")
    mlp = llm.engine.executor.runner.model.model.layers[2].mlp
    assert describe_layer(mlp.gate_up_proj) == "Int4KernelSegment"  # Q5_0 + Q5_1: two halves
    same = sum(
        a == b for x, y in zip(native, dense, strict=True) for a, b in zip(x, y, strict=True)
    )
    assert same >= 0.95 * sum(len(x) for x in dense)


def test_native_model_holds_no_dense_copy_when_told(tiny_gguf, monkeypatch):
    """With ``TESSELLM_GGUF_CPU_DENSE=off`` quantized layers keep only their codes: the
    model's bytes shrink by about the dense linear weights' fp32 size less the codes'
    size. (By default a model this small keeps dense copies for many-row calls.)"""
    from tessellm.model_loader import model_bytes

    monkeypatch.setenv("TESSELLM_GGUF_CPU_DENSE", "off")
    _, native = _greedy(tiny_gguf, "float32", quantization="gguf")
    _, dense = _greedy(tiny_gguf, "float32", quantization="none")
    native_model = native.engine.executor.runner.model
    dense_model = dense.engine.executor.runner.model
    linear_bytes = sum(
        p.numel() * 4 for n, p in dense_model.named_parameters() if n.endswith("proj.weight")
    )
    saved = model_bytes(dense_model) - model_bytes(native_model)
    assert saved > 0.6 * linear_bytes
    assert not any(n.endswith("proj.weight") for n, _ in native_model.named_parameters())


class _Layer(torch.nn.Module):
    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.parallel = ParallelInfo(rank=0, world_size=world_size)
        self.output_shard_sizes = [32]


def test_tensor_parallel_is_refused_with_a_way_out():
    with pytest.raises(ConfigError, match=r"tensor-parallel.*quantization='none'"):
        GGUFNative().create_weights(_Layer(2), 64, 32, torch.float32)
    GGUFNative().create_weights(_Layer(1), 64, 32, torch.float32)


def test_from_config_reads_only_gguf():
    assert isinstance(GGUFNative.from_config({"quant_method": "gguf"}), GGUFNative)
    assert isinstance(GGUFNative.from_config(None), GGUFNative)
    with pytest.raises(ValueError, match="not 'gptq'"):
        GGUFNative.from_config({"quant_method": "gptq"})


def test_conformance_kit():
    result = check_quantization_method("gguf", dtypes=[torch.float32, torch.bfloat16])
    assert result.passed, result.failures


def test_only_the_dense_path_caches_converted_weights(tiny_gguf, tessellm_cache_dir):
    """Raw blocks are read from the file itself each time; the dense path still writes
    (and reads back) its dequantized conversion."""

    def cached_weight_files():
        return sorted(p.name for p in tessellm_cache_dir.rglob("weights-*.safetensors"))

    native, _ = _greedy(tiny_gguf, "float32", quantization="gguf")
    assert cached_weight_files() == []
    dense, _ = _greedy(tiny_gguf, "float32", quantization="none")
    assert cached_weight_files() == ["weights-float32.safetensors"]
    again, _ = _greedy(tiny_gguf, "float32", quantization="none")
    assert native == dense == again


def test_qwen2_with_qkv_biases_equals_the_dense_load(tmp_path):
    """Another architecture of the native set: no Q/K permutation, dense q/k/v biases
    loaded beside the quantized matrices."""
    path = write_tiny_llama(tmp_path / "tiny-qwen2.gguf", TYPES, architecture="qwen2")
    dense, _ = _greedy(path, "float32", quantization="none")
    native, llm = _greedy(path, "float32", quantization="gguf")
    qkv = llm.engine.executor.runner.model.model.layers[0].self_attn.qkv_proj
    assert llm.engine.executor.runner.quantization == "gguf" and qkv.bias is not None
    assert native == dense
