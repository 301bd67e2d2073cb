"""Tiny random LLaVA checkpoints (with their processor) and transformers' greedy tokens
for them, for tests; no hub access."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"


def tiny_llava(
    path: Path, *, seed: int = 0, image_size: int = 28, patch_size: int = 7, **overrides: Any
) -> Path:
    """A random ``LlavaForConditionalGeneration`` (2-layer CLIP tower, 3-layer Llama with
    grouped KV heads) saved in ``path`` with a word-level tokenizer whose last id is
    ``<image>`` and a ``LlavaProcessor``. ``overrides`` are ``LlavaConfig`` fields."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tessellm.testing.models import TINY_DECODER, WEIGHT_STD, make_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = TINY_DECODER["vocab_size"]
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    fields: dict[str, Any] = dict(
        image_token_index=vocab - 1,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    fields.update(overrides)
    config = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TINY_DECODER), **fields)
    config.architectures = ["LlavaForConditionalGeneration"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
        with torch.no_grad():  # wide weights: peaked logits, as tessellm.testing's models
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, WEIGHT_STD)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = make_tokenizer(path, vocab - 1)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == vocab - 1
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    image_processor = CLIPImageProcessor(size=size, crop_size=crop)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=fields["vision_feature_select_strategy"],
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def sample_images(count: int = 3, seed: int = 0, size: tuple[int, int] = (40, 32)) -> list[Any]:
    """``count`` distinct random RGB images (odd sizes: the processor resizes and crops)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        for _ in range(count)
    ]


def hf_llava_greedy(
    path: Path, prompts: Sequence[tuple[str, list[Any]]], max_new_tokens: int
) -> tuple[list[list[int]], list[list[int]]]:
    """transformers' fp32 greedy continuation of each ``(text, images)`` prompt through the
    saved ``LlavaProcessor``; returns (prompt token ids, continuations)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    prompt_ids, outputs = [], []
    for text, images in prompts:
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        ids = inputs["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        prompt_ids.append(ids[0].tolist())
        outputs.append(gen[0, ids.shape[1] :].tolist())
    return prompt_ids, outputs
