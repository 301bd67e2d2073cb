"""No silent wrong output from extending the shared layers.

A platform's fused entries replace the code of the classes they were written for. Bound
here: a pure-torch table with every entry (the linear-fused ones included) that computes
the base classes' functions from their weights, as a kernel would. A family that
subclasses the MLP (a residual multiplier) or the attention gets its own code on it: its
tokens equal the same model's without fused ops, and differ from the plain Llama's. The
plain Llama still takes every fused entry, so the check is not passed by fusing nothing.
A family states its own attention needs: one that claims soft-capping is refused, with
that reason, by a backend without it.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams, hookimpl
from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionCapabilities
from tessellm.interfaces.model import AttentionRequirements, config_attention_requirements
from tessellm.interfaces.ops import FusedOps, bind_fused_ops
from tessellm.layers.activation import GatedActivation
from tessellm.layers.decoder import DecoderAttention, DecoderLayer, GatedMLP
from tessellm.layers.linear import ColumnParallelLinear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.plugins import get_plugins, register_plugin
from tessellm_attention_torch.backend import TorchPagedAttention
from tessellm_cpu.platform import CpuPlatform
from tessellm_llama.model import LlamaForCausalLM

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


# -- a pure-torch fused table: the base classes' functions, computed from their weights ---
def _norm(x, weight, eps, offset):
    x32 = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (offset + weight.float())).to(x.dtype) if offset else weight * x32.to(x.dtype)


def _silu_and_mul(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate(positions, x, cos, sin):
    c, s = cos[positions].unsqueeze(1).to(x.dtype), sin[positions].unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _rotary(positions, q, k, cos, sin):
    return _rotate(positions, q, cos, sin), _rotate(positions, k, cos, sin)


def _rotary_write_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    q, k = _rotary(positions, q, k, cos, sin)
    keep = slot_mapping >= 0
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping[keep]] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping[keep]] = v[keep]
    return q


def _linear(linear, x):
    return ColumnParallelLinear.forward(linear, x)  # the base class's matmul, as a kernel


def _norm_linear(norm, linear, x, residual, silu):
    summed = x if residual is None else x + residual
    out = _linear(linear, _norm(summed, norm.weight, norm.eps, norm.offset))
    return (_silu_and_mul(out) if silu else out), summed


def torch_fused_ops(calls: Counter) -> FusedOps:
    def counted(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)

        return call

    table = {
        "add_rms_norm": lambda x, r, w, eps, off: (_norm(x + r, w, eps, off), x + r),
        "rms_norm": _norm,
        "silu_and_mul": _silu_and_mul,
        "rotary_neox": _rotary,
        "rotary_neox_write_kv": _rotary_write_kv,
        "linear_silu_and_mul": lambda linear, x: _silu_and_mul(_linear(linear, x)),
        "rms_norm_linear": _norm_linear,
    }
    return FusedOps(**{name: counted(name, fn) for name, fn in table.items()})


# -- families that subclass the shared layers ----------------------------------------------
class ResidualScaledMLP(GatedMLP):
    def forward(self, x):
        return super().forward(x) * 2.5


class DampedAttention(DecoderAttention):
    def forward(self, positions, hidden, metadata):
        return super().forward(positions, hidden, metadata) * 0.25


class ScaledMLPLlama(LlamaForCausalLM):
    def build_layer(self, config, ctx, layer_idx):
        layer = super().build_layer(config, ctx, layer_idx)
        layer.mlp = ResidualScaledMLP(config.hidden_size, config.intermediate_size, ctx)
        return layer


class DampedAttentionLlama(LlamaForCausalLM):
    def build_layer(self, config, ctx, layer_idx):
        mlp = GatedMLP(config.hidden_size, config.intermediate_size, ctx)
        return DecoderLayer(config, ctx, DampedAttention(config, ctx), mlp)


class SoftCappedLlama(LlamaForCausalLM):
    @classmethod
    def attention_requirements(cls, config):
        needs = config_attention_requirements(config)
        return AttentionRequirements(
            needs.head_size, needs.num_heads, needs.num_kv_heads, False, True
        )


class NoSoftCapAttention(TorchPagedAttention):
    name = "no_softcap_test"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"*"}), dtypes=frozenset({torch.float32}), logits_soft_cap=False
    )


class Families:
    TESSELLM_PLUGIN_API = ">=1.0,<2"

    @hookimpl
    def register_models(self, register):
        for cls in (ScaledMLPLlama, DampedAttentionLlama, SoftCappedLlama):
            register(cls.__name__, cls)

    @hookimpl
    def register_attention_backends(self, register):
        register(NoSoftCapAttention.name, NoSoftCapAttention)


@pytest.fixture(scope="module")
def families():
    register_plugin(Families(), "extension-safety-families")
    yield
    get_plugins(refresh=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("llama"))


def as_architecture(checkpoint, architecture: str, tmp_path):
    """The checkpoint's files with ``architecture`` in its config (same weights)."""
    path = tmp_path / architecture
    path.mkdir()
    for f in checkpoint.iterdir():
        (path / f.name).symlink_to(f)
    (path / "config.json").unlink()
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = [architecture]
    (path / "config.json").write_text(json.dumps(config))
    return path


def greedy(path, prompts, fused: FusedOps | None, monkeypatch) -> list[list[int]]:
    monkeypatch.setattr(CpuPlatform, "fused_ops", lambda self, dtype: fused)
    llm = LLM(model=str(path), dtype="float32", device="cpu", enforce_eager=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY)
    return [o.outputs[0].token_ids for o in outs]


PROMPTS = [[1, 17, 33, 5, 90, 41], [1, 200, 3, 77], [1, 9, 9, 120, 64, 31, 8, 250]]


@pytest.mark.parametrize("architecture", ["ScaledMLPLlama", "DampedAttentionLlama"])
def test_subclassed_layers_keep_their_own_code_under_fused_ops(
    architecture, families, checkpoint, tmp_path, monkeypatch
):
    plain_calls: Counter = Counter()
    plain = greedy(checkpoint, PROMPTS, torch_fused_ops(plain_calls), monkeypatch)
    assert plain == greedy(checkpoint, PROMPTS, None, monkeypatch)
    # The plain Llama takes the linear-fused entries: two norm-linears a layer a step.
    assert plain_calls["rms_norm_linear"] > 0 and plain_calls["rotary_neox_write_kv"] > 0

    path = as_architecture(checkpoint, architecture, tmp_path)
    calls: Counter = Counter()
    extended = greedy(path, PROMPTS, torch_fused_ops(calls), monkeypatch)
    assert extended == greedy(path, PROMPTS, None, monkeypatch)
    assert extended != plain  # the subclass changes the function
    # Only the sub-layer that was not subclassed is fused with its norm.
    assert 0 < calls["rms_norm_linear"] < plain_calls["rms_norm_linear"]


def test_subclasses_of_fusable_layers_run_their_own_methods():
    calls: Counter = Counter()
    ops = torch_fused_ops(calls)
    torch.manual_seed(0)
    x = torch.randn(3, 8)

    class HalvedNorm(RMSNorm):
        def _norm(self, x):
            return super()._norm(x) * 0.5

    norm = HalvedNorm(8)
    expected = norm(x)
    bind_fused_ops(norm, ops)
    torch.testing.assert_close(norm(x), expected)
    assert calls["rms_norm"] == 0

    class ClampedActivation(GatedActivation):
        def forward(self, x):
            return super().forward(x).clamp(max=0.1)

    act = ClampedActivation()
    expected = act(x)
    bind_fused_ops(act, ops)
    torch.testing.assert_close(act(x), expected)
    assert calls["silu_and_mul"] == 1  # inside its own forward, through super()

    class Reversed(RotaryEmbedding):
        def _rotate(self, x, cos, sin):
            return super()._rotate(x, cos, -sin)

    config = tiny_llama_config()
    rotary = Reversed(config, 16, 64)
    q, k, positions = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.tensor([0, 5, 9])
    expected = rotary(positions, q, k)
    bind_fused_ops(rotary, ops)
    for got, want in zip(rotary(positions, q, k), expected, strict=True):
        torch.testing.assert_close(got, want)
    assert calls["rotary_neox"] == 0 and not rotary.fusable
    assert RotaryEmbedding(config, 16, 64).fusable


def test_a_family_states_its_attention_needs(families, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(CpuPlatform, "fused_ops", lambda self, dtype: None)
    LLM(model=str(checkpoint), dtype="float32", device="cpu", attention_backend="no_softcap_test")
    path = as_architecture(checkpoint, "SoftCappedLlama", tmp_path)
    with pytest.raises(ConfigError) as refused:
        LLM(model=str(path), dtype="float32", device="cpu", attention_backend="no_softcap_test")
    assert "refused no_softcap_test: model uses attention logit soft-capping" in str(refused.value)


def test_head_knobs_divide_where_their_families_do():
    from tessellm.interfaces.attention import AttentionSpec
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.interfaces.quantization import Unquantized

    config = tiny_llama_config(num_hidden_layers=1)
    spec = AttentionSpec("cpu", torch.bfloat16, 16, 4, 2, 16)
    ctx = ModelContext(
        torch.bfloat16,
        torch.device("cpu"),
        TorchPagedAttention(spec),
        Unquantized(),
        ParallelInfo(),
    )

    class MiniCPMLike(LlamaForCausalLM):
        def __init__(self, config, ctx):
            super().__init__(config, ctx, head_input_scaling=5.0, logits_scaling=3.0)

    torch.manual_seed(0)
    model = MiniCPMLike(config, ctx)
    model.lm_head.weight.normal_()
    hidden = torch.randn(5, 64, dtype=torch.bfloat16)
    # In bf16 each division rounds, so where it happens is part of the model.
    expected = model.lm_head(hidden / 5.0) / 3.0
    assert torch.equal(model.compute_logits(hidden), expected)
    assert not torch.equal(expected, model.lm_head(hidden) / 15.0)
    # A multiplier of exactly 1 is off: no multiply in the step.
    plain = DecoderLayer(config, ctx, DecoderAttention(config, ctx), GatedMLP(64, 128, ctx), 0, 1.0)
    assert plain.residual_multiplier is None
