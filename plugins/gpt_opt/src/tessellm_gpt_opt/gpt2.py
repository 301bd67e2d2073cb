"""GPT-2: pre-LN, GELU (tanh) MLP, learned positions; ``Conv1D`` weights stored ``[in, out]``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tessellm.layers.weight_streams import add_prefix, split_fused, transpose_matching
from tessellm_gpt_opt.decoder import LayerNormDecoderForCausalLM, LayerNormDecoderSpec

# GPT-2's checkpoint names -> the shared decoder's (substring replacements, in order).
RENAMES = (
    ("transformer.wte.", "model.embed_tokens."),
    ("transformer.wpe.", "model.embed_positions."),
    ("transformer.ln_f.", "model.final_layer_norm."),
    ("transformer.h.", "model.layers."),
    (".ln_1.", ".self_attn_layer_norm."),
    (".ln_2.", ".final_layer_norm."),
    (".attn.c_proj.", ".self_attn.o_proj."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)


class GPT2LMHeadModel(LayerNormDecoderForCausalLM):
    @staticmethod
    def spec_from_config(config: Any) -> LayerNormDecoderSpec:
        hidden = config.n_embd
        return LayerNormDecoderSpec(
            hidden_size=hidden,
            num_heads=config.n_head,
            intermediate_size=config.n_inner or 4 * hidden,
            num_layers=config.n_layer,
            vocab_size=config.vocab_size,
            max_positions=config.n_positions,
            activation=config.activation_function,
            layer_norm_eps=config.layer_norm_epsilon,
            scale_attn_weights=getattr(config, "scale_attn_weights", True),
            scale_by_inverse_layer=getattr(config, "scale_attn_by_inverse_layer_idx", False),
        )

    def checkpoint_names(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        hidden = self.spec.hidden_size
        # Checkpoints of the bare GPT2Model (the original `gpt2` files) lack "transformer.".
        weights = add_prefix(weights, "transformer.", unless=("lm_head.",))
        weights = transpose_matching(weights, r"\.(c_attn|c_proj|c_fc)\.weight$")
        weights = split_fused(
            weights,
            ".attn.c_attn.",
            [(f".self_attn.{p}_proj.", hidden) for p in "qkv"],
        )
        for name, tensor in weights:
            for old, new in RENAMES:
                name = name.replace(old, new)
            yield name, tensor
