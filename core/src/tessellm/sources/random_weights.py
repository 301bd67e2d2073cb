"""``random:<preset>``: real model shapes with random weights, so benchmarks need no download.

Resolving a name writes a directory into the cache: the preset's ``config.json`` (copied
from the model's Hugging Face config), a byte-level tokenizer with exactly the model's
vocabulary size, and a marker file ``random_weights.json``. The ``random`` weight format
(:mod:`tessellm.formats.random_weights`) reads such a directory and has the loader fill the
parameters on the device instead of reading tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import ModelSource

PREFIX = "random:"
MARKER_FILE = "random_weights.json"
DEFAULT_STD = 0.02

_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
}

# Written from each model's config.json on the Hugging Face hub (only the fields that
# shape the network or its tokens; no weights are involved).
PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": {
        **_LLAMA_COMMON,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {
        **_LLAMA_COMMON,
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "torch_dtype": "bfloat16",
    },
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": {
        **_LLAMA_COMMON,
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-0.6B (served by the Qwen model-family plugin)
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    },
    # Not a real model: small enough for CPU tests of the random-weights path.
    "tiny-llama": {
        **_LLAMA_COMMON,
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    },
}

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def build_tokenizer(vocab_size: int, bos_token_id: int | None, eos_token_ids: list[int]):
    """A byte-level tokenizer of exactly ``vocab_size`` ids that encodes any text.

    Every byte is a token (no merges), so any text round-trips; the remaining ids are
    filler words ``" w<i>"`` that decode to readable text; the config's BOS/EOS ids are
    special tokens. A random model may emit any id, and each one decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials: dict[int, str] = {}
    for i, eos in enumerate(eos_token_ids):
        specials[eos] = "<|end_of_text|>" if i == 0 else f"<|end_of_text_{i}|>"
    if bos_token_id is not None and bos_token_id not in specials:
        specials[bos_token_id] = "<|begin_of_text|>"
    if any(i >= vocab_size for i in specials):
        raise ModelLoadError(f"special token ids {sorted(specials)} exceed vocab {vocab_size}")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(alphabet) + len(specials):
        raise ModelLoadError(f"vocab size {vocab_size} is too small for a byte-level tokenizer")
    tokens: list[str] = []
    letters = iter(alphabet)
    filler = 0
    for idx in range(vocab_size):
        if idx in specials:
            tokens.append(specials[idx])
        elif (letter := next(letters, None)) is not None:
            tokens.append(letter)
        else:
            tokens.append(f"\u0120w{filler}")  # "Ġ" is the byte-level form of a space
            filler += 1
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No word-splitting regex: with no merges every byte is its own token anyway.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials.values()])
    eos_text = specials[eos_token_ids[0]] if eos_token_ids else None
    bos_text = specials.get(bos_token_id) if bos_token_id is not None else None
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_text, eos_token=eos_text)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def write_random_model(config: dict[str, Any], target: Path, seed: int = 0) -> Path:
    """Write config, tokenizer and marker for ``config`` into ``target`` (atomically)."""
    marker = {"seed": seed, "std": config.get("initializer_range", DEFAULT_STD), "config": config}
    if target.is_dir() and (target / MARKER_FILE).exists():
        if json.loads((target / MARKER_FILE).read_text()) == marker:
            return target
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        # The writer's transformers version tells transformers the files are current
        # (without it, some releases warn about an old Mistral tokenizer regex).
        written = {**config, "transformers_version": transformers_version()}
        (staging / "config.json").write_text(json.dumps(written, indent=2) + "\n")
        tokenizer = build_tokenizer(
            config["vocab_size"], config.get("bos_token_id"), _ids(config.get("eos_token_id"))
        )
        tokenizer.save_pretrained(staging)
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:  # another process wrote it first; theirs is as good as ours
            if not (target / MARKER_FILE).exists():
                raise
    return target


class RandomWeightsSource(ModelSource):
    """``random:<preset>``, e.g. ``random:llama-3-8b`` (see ``PRESETS``)."""

    name = "random"

    def __init__(self, presets: dict[str, dict[str, Any]] | None = None) -> None:
        self.presets = PRESETS if presets is None else presets

    def matches(self, model: str) -> bool:
        return model.startswith(PREFIX)

    def aliases(self) -> list[str]:
        return [PREFIX + name for name in self.presets]

    def resolve(self, model: str, cache_dir: Path) -> Path:
        preset = model[len(PREFIX) :].lower()
        config = self.presets.get(preset)
        if config is None:
            raise ModelLoadError(
                f"unknown random-weights preset {preset!r}; known: {', '.join(self.presets)}"
            )
        return write_random_model(config, cache_dir / "random" / preset)
