"""The TPU platform chosen on XLA's CPU device with torch-xla installed, saying why, and
refused with the true reason without a TPU or PJRT_DEVICE=CPU."""

from __future__ import annotations

import pytest
from tpu_xla_support import require_xla

require_xla()

from typer.testing import CliRunner  # noqa: E402

from tessellm.cli.app import build_app  # noqa: E402
from tessellm.errors import ConfigError  # noqa: E402
from tessellm.plugins import get_plugins  # noqa: E402
from tessellm.selection import choose_platform  # noqa: E402
from tessellm_tpu import platform as tpu  # noqa: E402


def test_device_tpu_chooses_the_tpu_platform_and_says_why():
    platform, choice = choose_platform(get_plugins(), "tpu")
    assert platform.name == "tpu"
    assert choice.reason == tpu.probe_tpu()[1]
    if not tpu.tpu_device_nodes():
        assert "PJRT_DEVICE=CPU" in choice.reason
    assert platform.device().type == "xla"


def test_tessellm_plugins_shows_the_choice(tiny_model_factory):
    model = str(tiny_model_factory("LlamaForCausalLM"))
    result = CliRunner().invoke(build_app(), ["plugins", "--device", "tpu", "--model", model])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    at = lines.index("platform: tpu")
    assert lines[at + 1] == f"  chosen: {tpu.probe_tpu()[1]}"
    assert "attention preference: xla, torch" in result.output
    assert "attention: xla" in lines


def test_refused_without_a_tpu_or_xla_cpu(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    monkeypatch.setattr(tpu, "tpu_device_nodes", lambda: [])
    tpu.probe_tpu.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"no TPU device node .* PJRT_DEVICE is not CPU"):
            choose_platform(get_plugins(), "tpu")
        monkeypatch.setenv("PJRT_DEVICE", "CUDA")
        tpu.probe_tpu.cache_clear()
        assert "runs torch_xla on a TPU or XLA's CPU" in tpu.TpuPlatform.unavailable_reason()
    finally:
        monkeypatch.undo()
        tpu.probe_tpu.cache_clear()
