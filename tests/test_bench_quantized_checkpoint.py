"""bench/quantized_checkpoint.py writes GPTQ, AWQ and fp8 checkpoints of random weights
that tessellm loads as quantized checkpoints (chosen by their quant_method) and decodes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tessellm import LLM, SamplingParams
from tessellm.sources.random_weights import MARKER_FILE

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "quantized_checkpoint.py"
NEW_TOKENS = 4
# An attribute each method sets on the linear layers it loaded.
LOADED_MARK = {"gptq": "int4_path", "awq": "int4_path", "fp8": "fp8_kernel"}


def load_script():
    spec = importlib.util.spec_from_file_location("bench_quantized_checkpoint", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def eager_decode(monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")  # the eager step, no background build


def checkpoint_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor in the shards: name -> (dtype, shape), checked against the index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    found: dict[str, tuple[str, list[int]]] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert index["weight_map"][name] == shard.name
                sl = f.get_slice(name)
                found[name] = (sl.get_dtype(), list(sl.get_shape()))
    assert set(found) == set(index["weight_map"])
    return found


# (method, run dtype, q_proj's stored tensors for the tiny llama: 64 inputs, 64 outputs,
# groups of 32)
CASES = [
    (
        "gptq",
        "float32",
        {
            "qweight": ("I32", [8, 64]),
            "qzeros": ("I32", [2, 8]),
            "scales": ("F16", [2, 64]),
            "g_idx": ("I32", [64]),
        },
    ),
    (
        "awq",
        "bfloat16",
        {"qweight": ("I32", [64, 8]), "qzeros": ("I32", [2, 8]), "scales": ("F16", [2, 64])},
    ),
    ("fp8", "float32", {"weight": ("F8_E4M3", [64, 64]), "weight_scale": ("F32", [64, 1])}),
]


@pytest.mark.parametrize(("method", "dtype", "q_proj"), CASES, ids=[c[0] for c in CASES])
def test_written_checkpoint_loads_quantized_and_decodes(tmp_path, method, dtype, q_proj):
    script = load_script()
    out = tmp_path / method
    # A shard limit below the model's size, so the index spans several files.
    argv = ["--model", "random:tiny-llama", "--method", method, "--out", str(out)]
    argv += ["--group-size", "32", "--device", "cpu", "--dtype", dtype, "--max-shard-gb", "1e-4"]
    assert script.main(argv) == out

    assert not (out / MARKER_FILE).exists()
    assert (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == script.QUANT_CONFIGS[method](32)
    assert config["torch_dtype"] == dtype
    tensors = checkpoint_tensors(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    prefix = "model.layers.1.self_attn.q_proj."
    assert {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)} == q_proj
    # Dense: the embeddings, the LM head and the norms, in the requested dtype.
    stored = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    assert tensors["lm_head.weight"] == (stored, [384, 64])
    assert tensors["model.norm.weight"] == (stored, [64])

    llm = LLM(model=str(out), dtype=dtype, device="cpu", max_model_len=64)
    runner = llm.engine.executor.runner
    assert runner.quantization == method
    quantized = [m for m in runner.model.modules() if hasattr(m, LOADED_MARK[method])]
    assert len(quantized) == 4 * 2  # qkv, o, gate_up, down in each of 2 layers
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    (output,) = llm.generate(["Hello, my name is"], params)
    token_ids = output.outputs[0].token_ids
    assert len(token_ids) == NEW_TOKENS
    assert all(0 <= t < 384 for t in token_ids)


def test_existing_output_is_kept_without_force(tmp_path):
    script = load_script()
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["--model", "random:tiny-llama", "--method", "gptq", "--out", str(out)]
    with pytest.raises(SystemExit, match="exists"):
        script.main([*argv, "--device", "cpu"])
    assert (out / "keep.txt").read_text() == "mine"
