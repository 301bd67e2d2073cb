"""The ``random:<preset>`` model source and the ``random`` weight format (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.errors import ModelLoadError
from tessellm.formats.random_weights import RandomWeights, RandomWeightsFormat
from tessellm.sources.random_weights import (
    MARKER_FILE,
    PRESETS,
    RandomWeightsSource,
    build_tokenizer,
)

# Parameter counts of the real checkpoints (from their model cards / safetensors index).
EXPECTED_PARAMS = {
    "llama-3-8b": 8.03e9,
    "llama-3.2-1b": 1.236e9,
    "smollm2-135m": 134.5e6,
    "qwen3-0.6b": 0.596e9,
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_preset_shapes_match_the_real_model(preset):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(PRESETS[preset])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == pytest.approx(EXPECTED_PARAMS[preset], rel=0.01)
    assert type(model).__name__ == fields["architectures"][0]


def test_tokenizer_covers_the_whole_vocabulary():
    tok = build_tokenizer(300, bos_token_id=0, eos_token_ids=[2, 7])
    assert len(tok) == 300
    text = "Grüße, world! 1 2 3"
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_token_id == 2 and tok.bos_token_id == 0
    assert tok.convert_ids_to_tokens(7) == "<|end_of_text_1|>"
    # Every id, fillers included, decodes to text (a random model emits any of them).
    assert tok.decode([299]).startswith(" w")


def test_resolve_writes_once_and_rewrites_on_change(tmp_path):
    presets = {"toy": dict(PRESETS["tiny-llama"])}
    source = RandomWeightsSource(presets)
    assert source.matches("random:toy") and not source.matches("toy")
    path = source.resolve("random:toy", tmp_path)
    assert RandomWeightsFormat().accepts(path)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert source.resolve("random:toy", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    presets["toy"]["num_hidden_layers"] = 3
    source.resolve("random:toy", tmp_path)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((path / MARKER_FILE).read_text())["config"]["num_hidden_layers"] == 3
    with pytest.raises(ModelLoadError, match="known: toy"):
        source.resolve("random:nope", tmp_path)


def test_fill_draws_matrices_and_keeps_vectors():
    layer = torch.nn.Module()
    layer.proj = torch.nn.Linear(256, 512)
    layer.norm = torch.nn.LayerNorm(256)
    with torch.no_grad():
        layer.proj.bias.zero_()
    names = RandomWeights(seed=3, std=0.05).fill(layer)
    assert names == {n for n, _ in layer.named_parameters()}
    assert layer.proj.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(layer.norm.weight, torch.ones(256))
    assert torch.equal(layer.proj.bias, torch.zeros(512))
    again = torch.nn.Linear(256, 512)
    RandomWeights(seed=3, std=0.05).fill(again)
    assert torch.equal(again.weight, layer.proj.weight)


def test_engine_runs_a_random_model(tmp_path):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = []
    for _ in range(2):
        llm = LLM("random:tiny-llama", download_dir=str(tmp_path), device="cpu", dtype="float32")
        assert len(llm.get_tokenizer()) == PRESETS["tiny-llama"]["vocab_size"]
        outs.append(llm.generate(["Hello world", "abc"], greedy))
    first, second = ([o.outputs[0].token_ids for o in run] for run in outs)
    assert first == second  # the seeded fill makes the same model each time
    assert all(len(ids) == 6 for ids in first)
    assert first[0] != first[1]
