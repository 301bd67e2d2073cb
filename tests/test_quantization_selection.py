"""Which quantization method a model gets: the checkpoint's ``quant_method``, the user's
choice, the platform default; the reasons when none can load it."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from conftest import in_process_plugin
from typer.testing import CliRunner

from tessellm.errors import ConfigError, ModelLoadError
from tessellm.hookspecs import InstallHint
from tessellm.interfaces.quantization import QuantCapabilities, Unquantized
from tessellm.plugins import get_plugins, register_plugin
from tessellm.selection import build_quantization, choose_platform, choose_quantization


class CheckpointReader(Unquantized):
    """Reads dense weights, but declares a checkpoint format: enough to test selection."""

    name = "fakeq"
    capabilities = QuantCapabilities(device_types=("cpu",), checkpoint_formats=("fakeq",))
    configs: ClassVar[list] = []

    @classmethod
    def from_config(cls, quant_config):
        if quant_config and quant_config.get("bits") == 3:
            raise ValueError("3-bit weights are not supported (bits: 4 or 8)")
        cls.configs.append(quant_config)
        return cls()


class Bf16NativeGGUF(Unquantized):
    name = "bf16_native_gguf"
    capabilities = QuantCapabilities(
        checkpoint_formats=("deq",), preferred_dtypes=(torch.bfloat16,)
    )


class Fp32Only(Unquantized):
    name = "fp32only"
    capabilities = QuantCapabilities(dtypes=(torch.float32,))


@pytest.fixture
def plugins(fresh_plugins):
    def register_methods(register):
        register("fakeq", CheckpointReader)
        register("fp32only", Fp32Only)
        register("bf16_native_gguf", Bf16NativeGGUF)

    def register_hints(register):
        register("madeupq", InstallHint("tessellm-madeupq", "madeupq"))

    register_plugin(
        in_process_plugin(
            register_quantization_methods=register_methods,
            register_install_hints=register_hints,
        ),
        "quant_selection_test",
    )
    CheckpointReader.configs.clear()
    return get_plugins()


def _checkpoint(quant_method: str, **fields) -> SimpleNamespace:
    return SimpleNamespace(quantization_config={"quant_method": quant_method, **fields})


def _choose(plugins, config=None, requested=None, dtype=torch.float32):
    platform, _ = choose_platform(plugins)
    return choose_quantization(plugins, platform, dtype, requested, config)


def test_the_checkpoint_format_chooses_the_method_that_reads_it(plugins):
    choice = _choose(plugins, _checkpoint("fakeq", bits=4))
    assert choice.name == "fakeq" and "quant_method 'fakeq'" in choice.reason
    assert choice.method_config() == {"quant_method": "fakeq", "bits": 4}
    build_quantization(plugins, choice, torch.device("cpu"), torch.float32)
    assert CheckpointReader.configs == [{"quant_method": "fakeq", "bits": 4}]


def test_a_method_that_cannot_read_the_checkpoint_is_refused(plugins):
    with pytest.raises(ConfigError, match=r"quantized with 'fakeq'.*'none' cannot load it"):
        _choose(plugins, _checkpoint("fakeq"), requested="none")


def test_a_format_no_installed_method_reads_names_the_package(plugins):
    with pytest.raises(ModelLoadError, match="pip install tessellm-madeupq"):
        _choose(plugins, _checkpoint("madeupq"))


def test_gguf_weights_may_be_dequantized_for_another_method(plugins):
    choice = _choose(plugins, _checkpoint("gguf"), requested="none")
    assert (choice.name, choice.dequantize, choice.method_config()) == ("none", True, None)


def test_a_format_reader_is_picked_unasked_only_in_its_preferred_dtypes(plugins, monkeypatch):
    import tessellm.selection

    # A format that, like GGUF, its weight format can also hand out dense.
    monkeypatch.setattr(tessellm.selection, "DEQUANTIZABLE_FORMATS", ("gguf", "deq"))
    native = _choose(plugins, _checkpoint("deq"), dtype=torch.bfloat16)
    assert (native.name, native.dequantize) == ("bf16_native_gguf", False)
    dense = _choose(plugins, _checkpoint("deq"), dtype=torch.float32)
    assert (dense.name, dense.dequantize) == ("none", True)
    assert "not preferred in float32" in dense.reason
    asked = _choose(plugins, _checkpoint("deq"), requested="bf16_native_gguf")
    assert (asked.name, asked.dequantize) == ("bf16_native_gguf", False)


def test_auto_dtype_follows_the_format_readers_preference(plugins, monkeypatch):
    import tessellm.selection
    from tessellm.selection import default_dtype_for

    monkeypatch.setattr(tessellm.selection, "DEQUANTIZABLE_FORMATS", ("gguf", "deq"))
    platform, _ = choose_platform(plugins)
    assert default_dtype_for(plugins, platform, _checkpoint("deq")) == torch.bfloat16
    base = platform.default_dtype()
    assert default_dtype_for(plugins, platform, _checkpoint("deq"), requested="none") == base
    assert default_dtype_for(plugins, platform, SimpleNamespace()) == base


def test_a_dense_checkpoint_gets_the_request_or_the_platform_default(plugins):
    assert _choose(plugins, SimpleNamespace(), requested="fp32only").name == "fp32only"
    assert _choose(plugins, SimpleNamespace(quantization_config=None)).name == "none"  # fp32


def test_a_method_that_needs_its_checkpoint_format_refuses_a_dense_one(plugins):
    with pytest.raises(ConfigError, match=r"'fakeq' loads fakeq checkpoints.*dense.*fp32only"):
        _choose(plugins, SimpleNamespace(), requested="fakeq")


def test_unsupported_checkpoint_settings_and_devices_are_config_errors(plugins):
    with pytest.raises(ConfigError, match="'fakeq': 3-bit weights are not supported"):
        build_quantization(
            plugins, _choose(plugins, _checkpoint("fakeq", bits=3)), torch.device("cpu"), None
        )
    choice = _choose(plugins, requested="fp32only", dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="'fp32only' cannot run here: runs in float32, not bf"):
        build_quantization(plugins, choice, torch.device("cpu"), torch.bfloat16)


def test_the_engine_and_tessellm_plugins_follow_the_checkpoint(plugins, tmp_path):
    from tessellm import LLM, SamplingParams
    from tessellm.cli.app import build_app
    from tessellm.testing import tiny_model

    model = tiny_model("LlamaForCausalLM", tmp_path / "m")
    dense = LLM(str(model), dtype="float32", enforce_eager=True)
    params = SamplingParams(max_tokens=6, temperature=0)
    expected = dense.generate(["a b c"], params)[0].outputs[0].token_ids
    del dense
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fakeq", "bits": 8}
    (model / "config.json").write_text(json.dumps(config))

    llm = LLM(str(model), dtype="float32", enforce_eager=True)
    assert llm.engine.executor.runner.quantization == "fakeq"
    assert CheckpointReader.configs[-1] == {"quant_method": "fakeq", "bits": 8}
    assert llm.generate(["a b c"], params)[0].outputs[0].token_ids == expected

    result = CliRunner().invoke(
        build_app(), ["plugins", "--model", str(model), "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    assert "quantization: fakeq (the checkpoint's quant_method 'fakeq')" in result.stdout
    assert "  can run: devices cpu; dtypes float32, bfloat16, float16" in result.stdout
