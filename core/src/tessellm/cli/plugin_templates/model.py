"""Template of a model-family plugin: tessellm's shared decoder serving one HF architecture."""

from __future__ import annotations

# An architecture transformers knows (so the generated test has a reference to compare
# with), that tessellm's shared decoder computes exactly as it stands, and that no
# first-party family registers (so the generated family is the one tested, not
# overriding nor overridden by tessellm-llama). Ministral is Llama with a per-layer
# sliding window.
DEFAULT_ARCHITECTURE = "MinistralForCausalLM"

DESCRIPTION = "Model family $name ($architecture)"
IMPL_MODULE = "model"
IMPL_SUMMARY = (
    "`$class_name`, built from tessellm's shared pre-norm decoder "
    "(`tessellm.layers.decoder`): grouped-query attention with rotary positions and a "
    "per-layer sliding window, a gated MLP, RMSNorm, an optionally tied LM head."
)
TEST_SUMMARY = (
    "greedy tokens against HF transformers on a random tiny `$architecture` "
    "(`check_model_family`), and that this package is the one serving the architecture."
)
USAGE = """\
Serve a checkpoint whose `config.json` says `"architectures": ["$architecture"]`:
`tessellm generate --model /path/to/checkpoint`. To port another architecture, generate
with `--architecture ThatForCausalLM` and change `build_layer` (biases, q/k norms, the
MLP) and the checkpoint names (`weight_renames`) until the test passes.
"""

PLUGIN_IMPORTS = """\
from tessellm import hookimpl
from tessellm.hookspecs import InstallHint
"""

PLUGIN = """\


@hookimpl
def register_models(register):
    register(
        "$architecture",
        "$package.model:$class_name",
    )


@hookimpl
def register_install_hints(register):
    # Lets tessellm's "no plugin provides ..." error name this package to install.
    register(
        "$architecture",
        InstallHint("$dist", "$name"),
    )
"""

IMPL = '''\
"""$architecture on tessellm's shared pre-norm decoder.

Each layer is RMSNorm -> grouped-query attention with rotary positions -> residual ->
RMSNorm -> gated MLP -> residual; the LM head may be tied to the embedding. The decoder
also loads HF checkpoints: ``q/k/v_proj`` are fused into ``qkv_proj`` and
``gate/up_proj`` into ``gate_up_proj`` by ``weight_rules``; ``weight_renames`` maps other
checkpoint names onto these. Where an architecture differs, say so here (``build_layer``
arguments, a subclassed MLP, ``build_model``), and let the parity test prove it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tessellm.interfaces.model import ModelContext
from tessellm.layers.decoder import (
    DecoderAttention,
    DecoderForCausalLM,
    DecoderLayer,
    GatedMLP,
    layer_sliding_window,
)


class $class_name(DecoderForCausalLM):
    # Substring replacements from checkpoint names to this module's parameter names.
    weight_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> DecoderLayer:
        attention_bias = bool(getattr(config, "attention_bias", False))
        attention = DecoderAttention(
            config,
            ctx,
            # As transformers decides it: layer_types, else sliding_window, else none.
            sliding_window=layer_sliding_window(config, layer_idx),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
        )
        mlp = GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            ctx,
            getattr(config, "hidden_act", "silu"),
            bias=bool(getattr(config, "mlp_bias", False)),
        )
        return DecoderLayer(config, ctx, attention, mlp)
'''

TEST = '''\
"""Tests of this model family against HF transformers, with tessellm's conformance kit."""

from tessellm.plugins import get_plugins
from tessellm.testing import check_model_family

ARCHITECTURE = "$architecture"


def test_this_package_serves_the_architecture():
    registration = get_plugins().get("models", ARCHITECTURE)
    assert registration is not None, f"nothing registers {ARCHITECTURE}"
    # Another installed plugin registering the same name would override this one.
    served_by = registration.plugin
    assert served_by == "$name", f"{ARCHITECTURE} is served by {served_by}"


def test_greedy_tokens_match_transformers():
    # A random tiny checkpoint of the architecture; tessellm's greedy tokens must equal
    # HF's in fp32: batched, one at a time, with prefix-cache hits and under preemption.
    result = check_model_family(ARCHITECTURE)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()
'''
