"""Model families: what a model class receives and must provide."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from tessellm.interfaces.attention import AttentionBackend, AttentionMetadata
    from tessellm.interfaces.pipeline import PipelineStage
    from tessellm.interfaces.quantization import QuantizationMethod
    from tessellm.interfaces.schedule import SchedulerOutput


@dataclass(slots=True)
class ParallelInfo:
    """Tensor-parallel position of this process (world size 1 without parallelism)."""

    rank: int = 0
    world_size: int = 1
    group: object | None = None  # a torch.distributed process group when world_size > 1
    # This rank's device index on its own machine (None: the rank). Differs from the rank
    # on multi-machine runs, and is 0 where Ray gives each actor one visible GPU.
    local_rank: int | None = None
    # enable_expert_parallel: MoE layers hold whole experts, E / world_size per rank, rather
    # than a slice of every expert (tessellm.layers.moe).
    expert_parallel: bool = False
    # pipeline_parallel_size > 1: this rank's stage (its layers; rank/world_size/group are
    # then those of the stage's tensor-parallel group).
    pipeline: PipelineStage | None = None

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


@dataclass(frozen=True, slots=True)
class AttentionRequirements:
    """What a model asks of the attention backend, read before the model is built.

    Head counts are the whole model's (the engine divides them among tensor-parallel
    ranks). ``sliding_window`` / ``logits_soft_cap``: some layer attends over a window /
    soft-caps its scores, so a backend without that capability is refused, with the reason.
    """

    head_size: int
    num_heads: int
    num_kv_heads: int
    sliding_window: bool = False
    logits_soft_cap: bool = False


def config_attention_requirements(config: Any) -> AttentionRequirements:
    """The requirements read from the usual transformers config fields: ``head_dim`` (or
    ``hidden_size / num_attention_heads``), ``num_key_value_heads``, a ``sliding_window``
    that some layer uses (``use_sliding_window``, ``layer_types``), and
    ``attn_logit_softcapping``. Multimodal configs are read through their text config."""
    getter = getattr(config, "get_text_config", None)
    cfg = getter() if getter else config
    heads = cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False:
        window = None
    # Qwen2/Qwen3 list which layers are windowed; with max_window_layers >= the layer
    # count none is, and the model needs no window support.
    layer_types = getattr(cfg, "layer_types", None)
    if window and layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    return AttentionRequirements(
        head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        sliding_window=bool(window),
        logits_soft_cap=bool(getattr(cfg, "attn_logit_softcapping", None)),
    )


class ConfigAttentionRequirements:
    """Mixin giving a model class :func:`config_attention_requirements` as its
    ``attention_requirements`` (``DecoderForCausalLM`` has it); a family whose attention
    differs from what those fields say overrides the classmethod."""

    @classmethod
    def attention_requirements(cls, config: Any) -> AttentionRequirements:
        return config_attention_requirements(config)


class CausalLM(Protocol):
    """A decoder-only model over a packed batch of tokens.

    ``forward`` takes ``input_ids`` and ``positions`` of shape ``[num_tokens]`` and returns
    hidden states ``[num_tokens, hidden_size]``; ``compute_logits`` maps chosen rows to
    ``[rows, vocab_size]`` (the full vocabulary on every rank). ``load_weights`` consumes
    ``(hf_name, tensor)`` pairs and returns the names it loaded. ``attention_requirements``
    says, from the config alone, what the backend must support (the engine picks the
    backend before building the model); :class:`ConfigAttentionRequirements` gives the
    default reading of the config.
    """

    @classmethod
    def attention_requirements(cls, config: PretrainedConfig) -> AttentionRequirements: ...

    def __init__(self, config: PretrainedConfig, ctx: ModelContext) -> None: ...

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]: ...


# What the model runner calls after each forward pass when a proposer asked for the hidden
# states (``ModelRunner.hidden_states_sink``): the step's plan and ``forward``'s output.
HiddenStatesSink = Callable[["SchedulerOutput", torch.Tensor], None]


@runtime_checkable
class HiddenStatesSource(Protocol):
    """How a family hands out hidden states to a speculative head that reads them (EAGLE).

    ``forward``'s rows are what such a head conditions on: row ``i`` is the LM head's input
    at position ``i`` (after the final norm), the state ``compute_logits`` turns into the
    distribution of the token after it. The head shares the family's token embedding,
    ``get_input_embeddings()`` (ids to ``[n, hidden]`` rows), and its LM head,
    ``compute_logits``. The model runner hands every step's rows to its
    ``hidden_states_sink`` with the step's plan: one row per token of each seq's
    ``token_ids``, in plan order, rows at drafts the target then rejects included (the sink
    tells them apart by comparing the tokens with the request's). A family built on
    ``tessellm.layers.decoder.DecoderForCausalLM`` has it."""

    def get_input_embeddings(self) -> nn.Module: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
