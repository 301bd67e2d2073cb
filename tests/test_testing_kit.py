"""The test kit itself (tessellm.testing): each check fails, with the reason, on a plugin
that is wrong in the way the check exists to catch, and the pytest plugin's fixtures load
through the installed entry point."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import in_process_plugin
from torch import nn

from tessellm.interfaces.platform import Platform
from tessellm.interfaces.quantization import Unquantized, set_weight_attrs
from tessellm.plugins import register_plugin
from tessellm.testing import (
    assert_greedy_parity,
    check_attention_backend,
    check_model_family,
    check_platform,
    check_quantization_method,
    tiny_model,
)
from tessellm.testing.models import UnknownArchitectureError
from tessellm_attention_torch.backend import TorchPagedAttention
from tessellm_llama.model import LlamaForCausalLM


def register(kind: str, name: str, target: object) -> None:
    hook = f"register_{kind}"
    register_plugin(in_process_plugin(**{hook: lambda register: register(name, target)}), name)


# -- tiny_model and the pytest plugin ---------------------------------------------------------


def test_tiny_model_translates_sizes_to_each_configs_field_names(tmp_path):
    gpt2 = json.loads((tiny_model("GPT2LMHeadModel", tmp_path / "g") / "config.json").read_text())
    assert (gpt2["n_embd"], gpt2["n_layer"], gpt2["n_head"]) == (64, 3, 4)
    assert "num_key_value_heads" not in gpt2  # not GPT-2's: a reader must not find it
    opt = json.loads((tiny_model("OPTForCausalLM", tmp_path / "o") / "config.json").read_text())
    assert (opt["ffn_dim"], opt["word_embed_proj_dim"]) == (128, 64)
    moe = tiny_model(
        "Qwen3MoeForCausalLM", tmp_path / "m", use_sliding_window=True, sliding_window=8
    )
    config = json.loads((moe / "config.json").read_text())
    # Qwen3-MoE saves num_experts under its alias num_local_experts.
    assert config["num_local_experts"] == 4 and config["sliding_window"] == 8
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    with pytest.raises(UnknownArchitectureError, match="NoSuchForCausalLM"):
        tiny_model("NoSuchForCausalLM", tmp_path / "x")


def test_pytest_plugin_fixtures_come_from_the_entry_point(
    request, tiny_model_factory, tessellm_cache_dir
):
    import tessellm.testing.pytest_plugin as plugin_module

    assert request.config.pluginmanager.get_plugin("tessellm") is plugin_module
    assert os.environ["TESSELLM_CACHE"] == str(tessellm_cache_dir)
    first = tiny_model_factory("LlamaForCausalLM", num_hidden_layers=2)
    second = tiny_model_factory("LlamaForCausalLM", seed=1)
    assert first != second and (first / "model.safetensors").exists()
    assert json.loads((first / "config.json").read_text())["num_hidden_layers"] == 2
    assert first.parent == second.parent  # this test's tmp_path


# -- assert_greedy_parity ---------------------------------------------------------------------


class FavoursToken7(LlamaForCausalLM):
    """Llama whose logits always favour token 7 once a sequence passes 10 tokens."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        logits[:, 7] += 1e3
        return logits


def test_parity_names_mode_prompt_position_and_both_token_lists(tmp_path, fresh_plugins):
    model = tiny_model("LlamaForCausalLM", tmp_path / "llama")
    assert_greedy_parity(model, modes=("batched",), max_tokens=4, device="cpu")
    register("models", "LlamaForCausalLM", FavoursToken7)
    with pytest.raises(AssertionError) as failure:
        assert_greedy_parity(model, modes=("batched",), max_tokens=4, device="cpu")
    message = str(failure.value)
    assert (
        "batched: prompt 0 (" in message and "first difference at generated position 0" in message
    )
    assert "tessellm: [7, 7, 7, 7]" in message and "HF:" in message


# -- check_attention_backend ------------------------------------------------------------------


class IgnoresWindow(TorchPagedAttention):
    name = "ignores_window"

    def forward(self, query, k_cache, v_cache, metadata, *, scale, sliding_window=None, **kw):
        return super().forward(query, k_cache, v_cache, metadata, scale=scale, **kw)


class SkipsLastSlot(TorchPagedAttention):
    name = "skips_last_slot"

    def write_kv(self, key, value, k_cache, v_cache, metadata) -> None:
        metadata.slot_mapping = metadata.slot_mapping.clone()
        metadata.slot_mapping[-1] = -1
        super().write_kv(key, value, k_cache, v_cache, metadata)


class AcceptsAnything(TorchPagedAttention):
    name = "accepts_anything"

    @classmethod
    def validate(cls, spec):
        return []


def test_attention_check_catches_an_ignored_window(fresh_plugins):
    register("attention_backends", "ignores_window", IgnoresWindow)
    result = check_attention_backend("ignores_window")
    assert not result.passed and result.skipped_reason is None
    assert all("window" in failure for failure in result.failures), result.failures
    assert any("differs from paged attention's definition" in f for f in result.failures)
    with pytest.raises(AssertionError, match="ignores_window"):
        result.raise_for_failures()


def test_attention_check_catches_a_missing_kv_write(fresh_plugins):
    register("attention_backends", "skips_last_slot", SkipsLastSlot)
    result = check_attention_backend("skips_last_slot")
    assert result.failures and all("write_kv" in f for f in result.failures)


def test_attention_check_wants_refusals_with_reasons(fresh_plugins):
    register("attention_backends", "accepts_anything", AcceptsAnything)
    failures = check_attention_backend("accepts_anything").failures
    assert any("validate accepts a spec with 5 heads over 2 KV heads" in f for f in failures)
    assert any("validate accepts a spec with unclaimed dtype torch.float64" in f for f in failures)


def test_attention_check_skips_devices_this_machine_lacks():
    result = check_attention_backend("triton" if not torch.cuda.is_available() else "torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert not result.passed and not result.failures
    assert "claims device types ['cuda', 'hip']" in result.skipped_reason


# -- check_quantization_method ----------------------------------------------------------------


class DropsBias(Unquantized):
    name = "drops_bias"

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight)


class RoundsToInt2(Unquantized):
    name = "rounds_to_int2"

    def process_weights_after_loading(self, layer) -> None:
        w = layer.weight.data
        step = w.abs().amax() / 2
        w.copy_((w / step).round().clamp(-2, 1) * step)


def test_quantization_check_catches_a_dropped_bias_and_a_lossy_format(fresh_plugins):
    register("quantization_methods", "drops_bias", DropsBias)
    failures = check_quantization_method("drops_bias", dtypes=[torch.float32]).failures
    assert failures and all(", bias]" in f for f in failures)
    register("quantization_methods", "rounds_to_int2", RoundsToInt2)
    result = check_quantization_method("rounds_to_int2", dtypes=[torch.float32])
    assert len(result.failures) == 72  # every shape, layer kind, bias and batch
    assert "relative error" in result.failures[0]


class StoresTransposed(Unquantized):
    """Keeps ``W.T`` (as some kernels want it); right only if it declares its dims."""

    name = "stores_transposed"
    declares_dims = True

    def create_weights(self, layer, in_features, out_features, dtype) -> None:
        weight_t = nn.Parameter(torch.empty(in_features, out_features, dtype=dtype), False)
        if self.declares_dims:
            set_weight_attrs(weight_t, output_dim=1, input_dim=0)
        layer.weight_t = weight_t

    def checkpoint_tensors(self, weight):
        return {"weight_t": weight.t().contiguous()}

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight_t.t(), bias)


class StoresTransposedUndeclared(StoresTransposed):
    name = "stores_transposed_undeclared"
    declares_dims = False


def test_quantization_check_loads_fused_layers_through_declared_dims(fresh_plugins):
    register("quantization_methods", "stores_transposed", StoresTransposed)
    check_quantization_method("stores_transposed", dtypes=[torch.float32]).raise_for_failures()
    register("quantization_methods", "stores_transposed_undeclared", StoresTransposedUndeclared)
    result = check_quantization_method("stores_transposed_undeclared", dtypes=[torch.float32])
    assert any("merged" in f for f in result.failures)
    assert any("qkv" in f for f in result.failures)


# -- check_platform ---------------------------------------------------------------------------


class SlowWrongPlatform(Platform):
    name = "slow_wrong"
    device_type = "cpu"
    attention_backends = ("torch", "no_such_backend")

    @classmethod
    def is_available(cls) -> bool:
        time.sleep(1.05)
        return True

    def default_dtype(self) -> torch.dtype:
        return torch.float64  # not in supported_dtypes()

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        return -1


class AbsentPlatform(Platform):
    name = "absent"
    device_type = "cpu"

    @classmethod
    def is_available(cls) -> bool:
        return False

    @classmethod
    def unavailable_reason(cls) -> str:
        return "needs the absent accelerator"

    def default_dtype(self) -> torch.dtype:
        return torch.float32

    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        return 0


def test_platform_check_lists_each_broken_promise(fresh_plugins):
    register("platforms", "slow_wrong", SlowWrongPlatform)
    failures = check_platform("slow_wrong").failures
    assert any("'no_such_backend'" in f and "not registered" in f for f in failures)
    assert any("is_available() took" in f for f in failures)
    assert any("default_dtype() torch.float64 not in supported_dtypes()" in f for f in failures)
    assert any("available_kv_cache_bytes(0.5, 0) returned -1" in f for f in failures)
    register("platforms", "absent", AbsentPlatform)
    absent = check_platform("absent")
    assert not absent.failures and not absent.passed
    assert absent.skipped_reason == "not available on this machine: needs the absent accelerator"


# -- check_model_family -----------------------------------------------------------------------


def test_family_check_fails_a_wrong_family_and_skips_an_unknown_one(fresh_plugins):
    register("models", "LlamaForCausalLM", FavoursToken7)
    result = check_model_family("LlamaForCausalLM", max_tokens=4)
    assert not result.passed
    assert {f.split(":")[0].split(" (")[0] for f in result.failures} == {
        "batched",
        "one_at_a_time",
        "prefix_cache",
        "preemption",
    }
    register("models", "NoSuchForCausalLM", FavoursToken7)
    unknown = check_model_family("NoSuchForCausalLM")
    assert not unknown.failures and "no causal-LM architecture" in unknown.skipped_reason


def test_cores_unquantized_method_conforms():
    result = check_quantization_method("none")
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
    assert len(result.checked) >= 12
