"""OPT (``facebook/opt-*``): learned positions offset by 2, ReLU MLP, optional projections
between a narrower word embedding and the hidden size, post-LN in OPT-350m."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tessellm.errors import ModelLoadError
from tessellm.layers.weight_streams import add_prefix
from tessellm_gpt_opt.decoder import LayerNormDecoderForCausalLM, LayerNormDecoderSpec

OPT_POSITION_OFFSET = 2  # OPT's position table keeps two rows before position 0

RENAMES = (
    ("model.decoder.", "model."),
    (".self_attn.out_proj.", ".self_attn.o_proj."),
    (".fc1.", ".mlp.fc1."),
    (".fc2.", ".mlp.fc2."),
)


class OPTForCausalLM(LayerNormDecoderForCausalLM):
    @staticmethod
    def spec_from_config(config: Any) -> LayerNormDecoderSpec:
        if not getattr(config, "layer_norm_elementwise_affine", True):
            raise ModelLoadError("OPT without LayerNorm weights is not supported")
        norm_before = config.do_layer_norm_before
        return LayerNormDecoderSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            intermediate_size=config.ffn_dim,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
            activation=config.activation_function,
            bias=getattr(config, "enable_bias", True),
            position_offset=OPT_POSITION_OFFSET,
            norm_before=norm_before,
            final_norm=norm_before and not getattr(config, "_remove_final_layer_norm", False),
            embed_size=getattr(config, "word_embed_proj_dim", None) or config.hidden_size,
            scale_query_first=True,
        )

    def checkpoint_names(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # The original facebook/opt-* files name the bare decoder ("decoder.layers...").
        for name, tensor in add_prefix(weights, "model.", unless=("lm_head.",)):
            for old, new in RENAMES:
                name = name.replace(old, new)
            yield name, tensor
