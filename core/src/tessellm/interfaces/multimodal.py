"""Image input: what a vision-language family declares, and what a request carries.

A family that takes images subclasses :class:`MultiModalModel` (besides the usual
``CausalLM`` members). The engine then, for a request with images, runs the model
folder's own Hugging Face image processor (``AutoImageProcessor``, never remote code),
expands each image placeholder token of the prompt to ``num_image_tokens`` copies, and
keeps one :class:`ImageInput` per image on the request. The model runner calls
``embed_images`` once for an image, when the first prompt chunk that covers any of its
placeholder positions runs, keeps the rows while a chunked prefill crosses them, and puts
them in place of the placeholder rows of ``embed_input_ids``'s output, which it passes
to ``forward`` as ``inputs_embeds``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tessellm.interfaces.attention import AttentionMetadata


@dataclass(slots=True)
class ImageInput:
    """One image of a prompt, after the image processor.

    Its embedding rows sit at prompt positions ``offset .. offset + length``, all holding
    the model's image token. ``content_hash`` identifies the processed pixels (prefix
    caching mixes it into the hash of the block where the image starts; the model runner
    keys its encoder cache by it). ``pixel_values``: the processor's tensor for this one
    image (CLIP-like processors: ``[3, H, W]``); ``extras``: its other per-image outputs
    (e.g. ``image_sizes``), for families whose processor gives some."""

    offset: int
    length: int
    content_hash: bytes
    pixel_values: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.offset + self.length


class MultiModalModel(ABC):
    """A family that takes images. The classmethods are read in the engine process
    (which holds no model: with tensor parallelism it lives in the workers)."""

    @classmethod
    @abstractmethod
    def image_token_id(cls, config: PretrainedConfig) -> int:
        """The prompt token that stands for one embedding row of an image."""

    @classmethod
    @abstractmethod
    def num_image_tokens(cls, config: PretrainedConfig, image: ImageInput) -> int:
        """How many rows ``embed_images`` gives for ``image`` (its ``offset``/``length``
        are not set yet: read its pixels' shape and extras)."""

    @abstractmethod
    def embed_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One ``[num_image_tokens, hidden_size]`` tensor per image, in order."""

    @abstractmethod
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embedding of ``input_ids`` (``[n, hidden_size]``) as ``forward``
        would compute it; image-token rows may hold anything (they are replaced)."""

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As ``CausalLM.forward``; with ``inputs_embeds`` the token embedding is skipped."""
