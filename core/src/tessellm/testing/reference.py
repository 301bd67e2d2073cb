"""Hugging Face transformers as the greedy reference (fp32)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def hf_greedy(
    path: Path | str, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, **load_kwargs: Any
) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, one at a time, in fp32.

    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"``, the
    implementation in which transformers applies soft-caps itself)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_kwargs).eval()
    return [hf_continuation(model, ids, max_new_tokens) for ids in prompt_ids]


def hf_continuation(model: Any, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """A loaded HF model's greedy continuation of one prompt, never stopping at EOS."""
    import torch

    inp = torch.tensor([list(prompt_ids)], device=model.device)
    with torch.no_grad():
        gen = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,  # one unpadded prompt: never used
        )
    return gen[0, len(prompt_ids) :].tolist()


def encode_prompts(
    model_dir: Path | str, prompts: Sequence[str | Sequence[int]]
) -> list[list[int]]:
    """Token ids of each prompt; text goes through the checkpoint's ``tokenizer.json``
    (``PreTrainedTokenizerFast``: transformers 5's ``AutoTokenizer`` would swap in the
    model type's own class for some configs), or ``AutoTokenizer`` without one."""
    texts = [p for p in prompts if isinstance(p, str)]
    tokenizer = None
    if texts:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if (Path(model_dir) / "tokenizer.json").exists():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens")
        out.append(ids)
    return out
