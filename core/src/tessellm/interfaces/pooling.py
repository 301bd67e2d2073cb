"""Pooling models: families that turn a prompt into one vector instead of generating.

Two kinds run on the pooling engine (``tessellm.engine.pooling``):

- an **encoder** family registers (``register_models``) a class that subclasses
  :class:`EncoderModel`: built as ``cls(config, ctx)``, ``forward(input_ids, positions,
  metadata)`` over the packed batch returns the token states ``[num_tokens, hidden]``, and
  ``load_weights`` as for a causal LM. Its attention runs over the whole batch at once,
  bidirectionally (``tessellm.layers.dense_attention``); nothing is cached.
- any **decoder** family (a ``DecoderForCausalLM``) runs as an embedding model too: its
  LM head is dropped and its causal attention runs through a backend that keeps no KV
  cache. Checkpoints saved as the bare model (``Qwen3Model``, weights without the
  ``model.`` prefix) map to the family of ``Qwen3ForCausalLM``.

The token states are then pooled as the checkpoint's sentence-transformers files say
(``tessellm.engine.pooler``), else by ``default_pooling``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tessellm.interfaces.model import ConfigAttentionRequirements

if TYPE_CHECKING:
    from tessellm.interfaces.attention import AttentionMetadata
    from tessellm.interfaces.model import ModelContext


class EncoderModel(nn.Module, ConfigAttentionRequirements, ABC):
    """Base of an encoder family's model class (e.g. ``BertModel``)."""

    # sentence-transformers' mode name used when the checkpoint names none.
    default_pooling: ClassVar[str] = "cls"

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()

    @abstractmethod
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Token states ``[num_tokens, hidden]`` of the packed batch (positions restart at
        0 for each sequence)."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load ``(hf_name, tensor)`` pairs; the parameter names loaded."""


def is_encoder_class(cls: object) -> bool:
    return isinstance(cls, type) and issubclass(cls, EncoderModel)
