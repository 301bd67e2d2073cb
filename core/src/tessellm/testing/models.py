"""Tiny random Hugging Face checkpoints of any causal-LM architecture, with a tokenizer
that needs no hub access."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEST_PROMPTS: list[str] = [
    "Hello, my name is",
    "The capital of France is",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole",
    "1 2 3 4 5 6",
    "The quick brown fox",
    "A",
    "Once upon a time, in a land far far away, there was a small village where",
    "def fibonacci(n):",
]

# Sizes and ids of the tiny test models (GQA: 4 query heads, 2 KV heads), in the Llama
# field names; ``tiny_model`` translates them for configs that name them otherwise.
TINY_DECODER: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# Fields that only some configs have, set where the config has them: otherwise the
# defaults are full-size (Gemma's head_dim 256, Qwen3-MoE's 128 experts, OPT's 768-wide
# projected embeddings) or tie a tiny model to a long context (LongRoPE's original length).
_WHERE_PRESENT: dict[str, Any] = dict(
    head_dim=16,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    shared_expert_intermediate_size=48,
    word_embed_proj_dim=64,
    ffn_dim=128,  # OPT
    n_inner=128,  # GPT-2
    pad_token_id=0,
    query_pre_attn_scalar=16,
    original_max_position_embeddings=512,
)
# State-space mixers whose defaults are full-size (or, for Bamba, have no attention layer,
# which transformers' own cache cannot run): tiny, several heads per group, 8-token chunks.
_MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "mamba2": dict(expand=2, num_heads=8, head_dim=16, n_groups=2, state_size=16, chunk_size=8),
    "bamba": dict(
        attn_layer_indices=[1],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=2,
        mamba_d_state=16,
        mamba_chunk_size=8,
    ),
}
# Widened weights (see ``save_tiny_model``): the standard deviation of every matrix.
WEIGHT_STD = 0.08


def make_tokenizer(path: Path, vocab_size: int) -> Any:
    """A word-level tokenizer covering ``TEST_PROMPTS``, padded with filler words to
    ``vocab_size``, saved into ``path`` (no hub access). Returns the fast tokenizer.

    Note: transformers 5's ``AutoTokenizer`` picks the model type's own tokenizer class
    for some configs (Qwen2), which splits these words wrongly; load it with
    ``PreTrainedTokenizerFast.from_pretrained`` (as ``assert_greedy_parity`` does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in TEST_PROMPTS for w in p.replace(",", " ,").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)
    return fast


def save_tiny_model(config: Any, path: Path, seed: int = 0) -> Path:
    """Random weights for ``config`` (its ``architectures[0]`` class, else the auto class),
    widened, saved as safetensors with a tokenizer. Returns ``path``."""
    import torch
    import transformers

    path = Path(path)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_cls is None:
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            model = model_cls(config)
        model.eval()
        # Wider weights than the default init give peaked logits, so fp32 rounding
        # differences between two correct implementations cannot flip a greedy argmax.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, WEIGHT_STD)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, config.vocab_size)
    return path


class UnknownArchitectureError(LookupError):
    """transformers has no causal-LM class of this name."""


def model_type_of(architecture: str) -> str:
    """The transformers ``model_type`` whose causal-LM class is ``architecture``.

    Several model types can share a class (``LlamaForCausalLM`` serves ``llama``,
    ``exaone``, ...): the one whose config class is named after the architecture wins."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    candidates = []
    for model_type, names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if architecture in (names if isinstance(names, (list, tuple)) else (names,)):
            candidates.append(model_type)
    if not candidates:
        raise UnknownArchitectureError(
            f"transformers has no causal-LM architecture named {architecture!r}"
        )
    stem = architecture.removesuffix("ForCausalLM").removesuffix("LMHeadModel")

    def preference(model_type: str) -> int:
        config_name = CONFIG_MAPPING_NAMES.get(model_type, "")
        if config_name in (f"{stem}Config", f"{stem}TextConfig"):
            return 0
        if model_type.replace("_", "").replace("-", "") == stem.lower():
            return 1
        return 2

    return min(candidates, key=preference)


def tiny_config(architecture: str, **config_overrides: Any) -> Any:
    """A tiny config of ``architecture``: ``TINY_DECODER`` sizes under the config's own
    field names, ``config_overrides`` (HF field names) last."""
    from transformers import AutoConfig

    model_type = model_type_of(architecture)
    default = AutoConfig.for_model(model_type)
    aliases = getattr(default, "attribute_map", {}) or {}
    values: dict[str, Any] = {}
    for key, value in {**TINY_DECODER, **_WHERE_PRESENT}.items():
        name = aliases.get(key, key)
        if hasattr(default, name):
            values[name] = value
    if "head_dim" in values:
        values["head_dim"] = TINY_DECODER["hidden_size"] // TINY_DECODER["num_attention_heads"]
    values.update(_MODEL_TYPE_DEFAULTS.get(model_type, {}))
    for key, value in config_overrides.items():
        values[aliases.get(key, key)] = value
    config = AutoConfig.for_model(model_type, **values)
    config.architectures = [architecture]
    return config


def tiny_model(architecture: str, path: Path, *, seed: int = 0, **config_overrides: Any) -> Path:
    """A random tiny checkpoint of ``architecture`` (any causal LM transformers knows)
    saved in ``path``: ``config.json``, safetensors weights widened for peaked logits, and
    a word-level tokenizer. ``config_overrides`` are HF config fields (e.g.
    ``sliding_window=8``). Returns ``path``.

    Raises ``UnknownArchitectureError`` (a ``LookupError``) for an unknown architecture."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return save_tiny_model(tiny_config(architecture, **config_overrides), path, seed=seed)
