"""``tessellm plugins --model``: each role's registration, class and distribution, and that
they are what the engine then uses."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tessellm import LLM
from tessellm.cli.app import build_app

ROLES = (
    "platform",
    "attention backend",
    "quantization method",
    "model family",
    "weight format",
    "model source",
)


def run_plugins(*args: str):
    return CliRunner().invoke(build_app(), ["plugins", *args])


def serving_roles(stdout: str) -> dict[str, list[str]]:
    """``role -> [name, module:Qualname, distribution, version, (plugin NAME)]``."""
    lines = stdout.split("serving roles:\n", 1)[1].splitlines()
    rows = {}
    for line in lines:
        for role in ROLES:
            if line.strip().startswith(role):
                rows[role] = line.strip()[len(role) :].split()
    assert list(rows) == list(ROLES), stdout
    return rows


def test_roles_name_the_class_and_distribution(tiny_llama):
    result = run_plugins("--model", str(tiny_llama), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    rows = serving_roles(result.stdout)
    assert rows["model family"][:4] == [
        "LlamaForCausalLM",
        "tessellm_llama.model:LlamaForCausalLM",
        "tessellm-llama",
        "0.1.0",
    ]
    assert rows["weight format"][:3] == [
        "safetensors",
        "tessellm.formats.safetensors:SafetensorsFormat",
        "tessellm",
    ]
    assert rows["model source"][:3] == [
        "local",
        "tessellm.sources.local:LocalPathSource",
        "tessellm",
    ]
    assert rows["platform"][:3] == ["cpu", "tessellm_cpu.platform:CpuPlatform", "tessellm-cpu"]
    # fp32 is the exact reference: the CPU platform's default method leaves it dense.
    assert rows["quantization method"][:2] == [
        "none",
        "tessellm.interfaces.quantization:Unquantized",
    ]


def test_roles_are_what_the_engine_uses(tiny_llama):
    result = run_plugins("--model", str(tiny_llama), "--dtype", "float32")
    assert result.exit_code == 0, result.output
    rows = serving_roles(result.stdout)
    engine = LLM(str(tiny_llama), dtype="float32", enforce_eager=True).engine
    try:
        described = engine.describe()
    finally:
        engine.shutdown()
    assert described["platform"].splitlines()[0] == f"platform: {rows['platform'][0]}"
    assert described["attention"].splitlines()[0] == f"attention: {rows['attention backend'][0]}"
    assert described["quantization"] == rows["quantization method"][0]


def test_platform_default_quantization_is_named_with_its_distribution(tiny_llama):
    # In bf16 the CPU platform picks woq_grid (lossless repacking) when no method is asked.
    result = run_plugins("--model", str(tiny_llama), "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    row = serving_roles(result.stdout)["quantization method"]
    assert row[:3] == [
        "woq_grid",
        "tessellm_quant_int4.woq:GridWeightOnlyInt4",
        "tessellm-quant-int4",
    ]


def test_requested_backend_and_method_are_explained(tiny_llama):
    result = run_plugins(
        "--model", str(tiny_llama), "--attention-backend", "torch", "--quantization", "none"
    )
    assert result.exit_code == 0, result.output
    rows = serving_roles(result.stdout)
    assert rows["attention backend"][:3] == [
        "torch",
        "tessellm_attention_torch.backend:TorchPagedAttention",
        "tessellm-attention-torch",
    ]
    assert rows["quantization method"][0] == "none"


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "/does/not/exist"), "neither a local path"),
        (("--model", "{tiny}", "--quantization", "no_such_method"), "no_such_method"),
        (("--model", "{tiny}", "--attention-backend", "no_such"), "no attention backend"),
        (("--model", "{tiny}", "--dtype", "float8"), "unknown dtype"),
    ],
)
def test_unusable_model_or_choice_is_one_line_and_exit_2(tiny_llama, args, message):
    args = tuple(a.replace("{tiny}", str(tiny_llama)) for a in args)
    result = run_plugins(*args)
    assert result.exit_code == 2
    assert "serving roles" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr


def test_architecture_no_plugin_serves_is_one_line_and_exit_2(tiny_llama, tmp_path):
    model = shutil.copytree(tiny_llama, tmp_path / "unknown-arch")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchFamilyForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    result = run_plugins("--model", str(model))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "NoSuchFamilyForCausalLM" in result.stderr
