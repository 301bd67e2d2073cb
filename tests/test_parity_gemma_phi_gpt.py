"""Tiny Gemma 2/3, Phi-3, GPT-2 and OPT configs with each family's special features on,
shared by the compiled-decode and family-plugin tests. (Their greedy parity with HF runs in
each family's own tests, plugins/*/tests, through tessellm.testing.)

Each config switches on what makes its family special: a sliding window of 8 tokens
(shorter than the longest prompts, and every sequence outgrows it while generating),
attention and final-logit soft-caps, alternating local/global layers with their own rope
bases, q/k norms, ``query_pre_attn_scalar``, GQA, Phi-3's partial rotary with LongRoPE
switching to its long factors mid-generation, GPT-2's per-layer score scaling, and OPT's
post-LN variant with projected embeddings. An HF reference for them runs eager attention,
the implementation in which transformers applies soft-caps and windows itself.
"""

from __future__ import annotations

WINDOW = 8
PHI3_LONG_ORIGINAL_MAX = 4
IDS = dict(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4)


# Gemma 2 and 3 alike: GQA, query_pre_attn_scalar != head_dim, both soft-caps on (Gemma 3
# configs carry the attention cap too; transformers does not apply it there, nor do we).
GEMMA = dict(
    num_hidden_layers=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=24,
    max_position_embeddings=256,
    sliding_window=WINDOW,
    attn_logit_softcapping=5.0,
    final_logit_softcapping=8.0,
)


def gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(**IDS, **SMALL, **GEMMA)  # alternates sliding and global layers


def gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **IDS,
        **SMALL,
        **GEMMA,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 4.0},
        },
    )


def phi3_config(original_max: int = 64):
    from transformers import Phi3Config

    rotary_half = 4  # head 16, partial_rotary_factor 0.5 -> 8 rotary dims -> 4 frequencies
    return Phi3Config(
        **IDS,
        **SMALL,
        num_hidden_layers=3,
        num_key_value_heads=2,
        max_position_embeddings=256,
        original_max_position_embeddings=original_max,
        sliding_window=WINDOW,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10_000.0,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": original_max,
            "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
            "long_factor": [2.0 + 3.0 * i for i in range(rotary_half)],
        },
    )


def phi3_long_config():
    """LongRoPE past the original context: prompts longer than 4 use the long factors
    throughout. (A sequence that crosses the limit while generating is re-prefilled by
    transformers with the long factors, which tessellm does not do; those prompts are
    left out of this case.)"""
    return phi3_config(original_max=PHI3_LONG_ORIGINAL_MAX)


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        **IDS,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=256,
        scale_attn_by_inverse_layer_idx=True,
    )


def opt_config():
    from transformers import OPTConfig

    return OPTConfig(
        **IDS,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
    )


def opt_post_ln_config():
    """OPT-350m's shape: LayerNorm after the residual add, narrower projected embeddings."""
    config = opt_config()
    config.do_layer_norm_before = False
    config.word_embed_proj_dim = 32
    return config


CONFIGS = {
    "Gemma2ForCausalLM": gemma2_config,
    "Gemma3ForCausalLM": gemma3_config,
    "Phi3ForCausalLM": phi3_config,
    "Phi3ForCausalLM-longrope-long": phi3_long_config,
    "GPT2LMHeadModel": gpt2_config,
    "OPTForCausalLM": opt_config,
    "OPTForCausalLM-post-ln": opt_post_ln_config,
}
# Cases that only use prompts longer than this many tokens.
MIN_PROMPT_TOKENS = {"Phi3ForCausalLM-longrope-long": PHI3_LONG_ORIGINAL_MAX}
