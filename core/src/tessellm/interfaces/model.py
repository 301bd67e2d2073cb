"""Model families: what a model class receives and must provide."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tessellm.interfaces.attention import AttentionBackend, AttentionMetadata
    from tessellm.interfaces.quantization import QuantizationMethod


@dataclass(slots=True)
class ParallelInfo:
    """Tensor-parallel position of this process (world size 1 without parallelism)."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed process group when world_size > 1
    # This rank's device index on its own machine (None: the rank). Differs from the rank
    # on multi-machine runs, and is 0 where Ray gives each actor one visible GPU.
    local_rank: int | None = None

    @property
    def device_index(self) -> int:
        return self.rank if self.local_rank is None else self.local_rank


@dataclass(slots=True)
class ModelContext:
    """Everything a model family needs from the engine to build its layers."""

    dtype: torch.dtype
    device: torch.device
    attention: AttentionBackend
    quantization: QuantizationMethod
    parallel: ParallelInfo


class CausalLM(Protocol):
    """A decoder-only model over a packed batch of tokens.

    ``forward`` takes ``input_ids`` and ``positions`` of shape ``[num_tokens]`` and returns
    hidden states ``[num_tokens, hidden_size]``; ``compute_logits`` maps chosen rows to
    ``[rows, vocab_size]`` (the full vocabulary on every rank). ``load_weights`` consumes
    ``(hf_name, tensor)`` pairs and returns the names it loaded.
    """

    def __init__(self, config: PretrainedConfig, ctx: ModelContext) -> None: ...

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...
