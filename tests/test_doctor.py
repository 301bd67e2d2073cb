"""``tessellm doctor``: conformance checks per installed plugin, failures with reasons."""

from __future__ import annotations

import torch
from conftest import in_process_plugin
from typer.testing import CliRunner

from tessellm.cli.app import build_app
from tessellm.plugins import get_plugins, register_plugin
from tessellm_attention_torch.backend import TorchPagedAttention


def run_doctor(*args: str):
    return CliRunner().invoke(build_app(), ["doctor", *args])


class ZeroAttention(TorchPagedAttention):
    """Claims the torch backend's capabilities and returns zeros: silently wrong."""

    name = "zeros"

    def forward(self, query, k_cache, v_cache, metadata, **kwargs) -> torch.Tensor:
        return torch.zeros_like(query)


def test_passes_on_the_torch_attention_backend():
    result = run_doctor("--plugin", "attention_torch")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("attention_torch  (tessellm-attention-torch ")
    assert "  PASS  attention backend 'torch'" in lines
    assert lines[-1] == "1 passed, 0 failed, 0 skipped"


def test_a_backend_returning_zeros_fails_with_the_reason(fresh_plugins):
    register_plugin(
        in_process_plugin(
            register_attention_backends=lambda register: register("zeros", ZeroAttention)
        ),
        "zeros_plugin",
    )
    result = run_doctor("--plugin", "zeros_plugin")
    assert result.exit_code == 1, result.output
    fail_lines = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert len(fail_lines) == 1, result.stdout
    assert fail_lines[0].startswith("  FAIL  attention backend 'zeros': ")
    assert len(fail_lines[0]) > len("  FAIL  attention backend 'zeros': ") + 10  # a reason
    assert result.stdout.splitlines()[-1] == "0 passed, 1 failed, 0 skipped"


def test_a_plugin_refused_at_discovery_is_a_failure(monkeypatch):
    found = get_plugins()
    monkeypatch.setitem(found.failures, "refused_plugin", "supports plugin API >=9,<10")
    result = run_doctor("--plugin", "refused_plugin")
    assert result.exit_code == 1
    assert "refused_plugin  (refused at discovery)" in result.stdout
    assert "  FAIL  plugin: supports plugin API >=9,<10" in result.stdout


def test_skips_with_reasons_what_it_cannot_check(fresh_plugins):
    register_plugin(
        in_process_plugin(
            register_models=lambda register: register(
                "NoSuchArchitectureForCausalLM", "tessellm_llama.model:LlamaForCausalLM"
            ),
            # The same name as attention_torch's: that one is now overridden.
            register_attention_backends=lambda register: register("torch", TorchPagedAttention),
            register_weight_formats=lambda register: register(
                "other_safetensors", "tessellm.formats.safetensors:SafetensorsFormat"
            ),
        ),
        "skipped_plugin",
    )
    result = run_doctor("--plugin", "attention_torch")
    assert result.exit_code == 0, result.output
    assert "  SKIP  attention backend 'torch': overridden by skipped_plugin" in result.stdout
    result = run_doctor("--plugin", "skipped_plugin")
    lines = result.stdout.splitlines()
    family = [line for line in lines if "model family 'NoSuchArchitectureForCausalLM'" in line]
    assert family and family[0].startswith("  SKIP  ") and "transformers" in family[0]
    assert "  SKIP  weight format 'other_safetensors': no conformance check" in result.stdout
    assert "  PASS  attention backend 'torch'" in lines


def test_an_unknown_plugin_is_a_usage_error():
    result = run_doctor("--plugin", "no_such_plugin")
    assert result.exit_code == 2
    assert "no plugin named 'no_such_plugin'" in result.stderr
