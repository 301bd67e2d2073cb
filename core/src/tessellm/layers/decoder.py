"""The pre-norm decoder most families share, with its options as arguments.

Grouped-query attention with rotary positions (optional q/k/v and output biases, optional
per-head q/k RMSNorm, a per-layer sliding window), a gated MLP or any other MLP module,
RMSNorm before each sub-layer, and an LM head that may be tied to the embedding. A family
subclasses :class:`DecoderForCausalLM`, says in ``build_layer`` how its layer ``i`` is
made, and states its checkpoint names as ``weight_rules`` / ``weight_renames``.

The scalar knobs real families use, each off by default (``None``, and then free):

- ``DecoderModel(embed_scale=)``: the embedding times the scale rounded to the model
  dtype (Gemma's ``sqrt(hidden_size)``, transformers' MiniCPM3 ``scale_emb``);
- ``DecoderModel(embedding_multiplier=)``: the embedding times the float (Granite's
  ``embedding_multiplier``, the original MiniCPM's ``scale_emb``);
- ``DecoderLayer(residual_multiplier=)``: ``residual + m * sublayer(x)`` (Granite's
  ``residual_multiplier``, MiniCPM's ``scale_depth / sqrt(num_hidden_layers)``);
- ``DecoderAttention(scale=)``: the score scale (Granite's ``attention_multiplier``);
- ``DecoderForCausalLM(logits_scaling=)``: logits divided by it (Granite);
- ``DecoderForCausalLM(head_input_scaling=)``: the final hidden states divided by it
  before the LM head (MiniCPM's ``hidden_size / dim_model_base``, which transformers'
  MiniCPM3 config calls ``logits_scaling``: not Granite's division of the logits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ConfigAttentionRequirements, ModelContext
from tessellm.interfaces.ops import FusedOps, runs_methods_of
from tessellm.layers.decoder_attention import DecoderAttention, layer_sliding_window
from tessellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tessellm.layers.gated_mlp import GatedMLP, runs_plain_linear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.pipeline import holds_embedding, is_last_stage, stage_layers
from tessellm.layers.scaled_embedding import ScaledVocabEmbedding
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES, WeightRule, load_by_rules

__all__ = [
    "DecoderAttention",
    "DecoderForCausalLM",
    "DecoderLayer",
    "DecoderModel",
    "GatedMLP",
    "layer_sliding_window",
]


def _multiplier(value: float | None) -> float | None:
    """``None`` for a knob that is off (absent or exactly 1), so it costs no multiply."""
    return None if value is None or float(value) == 1.0 else float(value)


def _runs_plain_norm(norm: nn.Module) -> bool:
    return runs_methods_of(norm, RMSNorm, "forward", "_norm")


class DecoderLayer(nn.Module):
    """RMSNorm → attention → residual → RMSNorm → MLP → residual (the adds fused in the
    norms: ``forward`` passes the residual stream along separately).

    ``residual_multiplier`` scales each sub-layer's output before it joins the residual
    stream (``residual + m * sublayer(x)``, Granite's and MiniCPM's form); the product is
    rounded to the model dtype before the add, as the reference computes it, so the fused
    add+norm that follows stays exact.

    A fused-op table's ``rms_norm_linear`` may fold each norm into the projection after it
    (and the SiLU into the gate/up projection), then the module's own methods finish:
    ``attend`` of a :class:`DecoderAttention`, ``activate``/``down`` of a
    :class:`GatedMLP`. It applies only where the modules run those classes' ``forward``
    (a subclass that overrides ``forward`` runs its own, unfused) and the norms and
    projections are the plain ones; where it declines, the modules run one by one."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        self_attn: nn.Module,
        mlp: nn.Module,
        norm_offset: float = 0.0,
        residual_multiplier: float | None = None,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)
        self.residual_multiplier = _multiplier(residual_multiplier)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        m = self.residual_multiplier
        return out if m is None else out * m

    def _fuse_attention(self) -> bool:
        attn = self.self_attn
        return (
            runs_methods_of(attn, DecoderAttention, "forward")
            and runs_plain_linear(attn.qkv_proj)
            and _runs_plain_norm(self.input_layernorm)
        )

    def _fuse_mlp(self) -> bool:
        mlp = self.mlp
        return (
            runs_methods_of(mlp, GatedMLP, "forward")
            and runs_plain_linear(mlp.gate_up_proj)
            and _runs_plain_norm(self.post_attention_layernorm)
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ops = self.fused_ops
        norm_linear = ops.rms_norm_linear if ops is not None else None
        attn, mlp = self.self_attn, self.mlp
        fused = None
        if norm_linear is not None and self._fuse_attention():
            fused = norm_linear(self.input_layernorm, attn.qkv_proj, hidden, residual, False)
        if fused is not None:
            qkv, residual = fused
            hidden = attn.attend(positions, qkv, metadata)
        else:
            if residual is None:
                residual = hidden
                hidden = self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = attn(positions, hidden, metadata)
        hidden = self._scaled(hidden)
        if norm_linear is not None and self._fuse_mlp():
            assert ops is not None
            # The SiLU goes into the same kernel where the table offers that epilogue.
            silu = ops.linear_silu_and_mul is not None and mlp.silu_fusable
            fused = norm_linear(
                self.post_attention_layernorm, mlp.gate_up_proj, hidden, residual, silu
            )
            if fused is not None:
                out, residual = fused
                return self._scaled(mlp.down(out if silu else mlp.activate(out))), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self._scaled(mlp(hidden)), residual


class DecoderModel(nn.Module):
    """Embedding, ``num_hidden_layers`` layers from ``build_layer(i)``, final RMSNorm.

    ``embed_scale`` multiplies the embedding by the scale rounded to the model dtype
    (Gemma: ``sqrt(hidden_size)``); ``embedding_multiplier`` multiplies it by the float as
    it is (Granite's ``embedding_multiplier``, the original MiniCPM's ``scale_emb``): the two round
    differently in bf16, each as its reference does. ``norm_offset`` is the final norm's
    weight offset (Gemma: 1)."""

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        build_layer: Callable[[int], nn.Module],
        embed_scale: float | None = None,
        norm_offset: float = 0.0,
        embedding_multiplier: float | None = None,
    ) -> None:
        super().__init__()
        vocab, hidden = config.vocab_size, config.hidden_size
        # A pipeline stage builds only what it runs (tessellm.layers.pipeline).
        self.embed_tokens = (
            None
            if not holds_embedding(config, ctx)
            else VocabParallelEmbedding(vocab, hidden, ctx)
            if embed_scale is None
            else ScaledVocabEmbedding(vocab, hidden, ctx, embed_scale)
        )
        self.embedding_multiplier = _multiplier(embedding_multiplier)
        self.layers = stage_layers(config.num_hidden_layers, ctx, build_layer)
        last = is_last_stage(ctx)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, ctx.dtype, norm_offset) if last else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_multiplier is not None:
            hidden = hidden * self.embedding_multiplier
        return hidden

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # inputs_embeds: a vision-language model's, image rows in place (interfaces.multimodal).
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module, ConfigAttentionRequirements, ABC):
    """A :class:`tessellm.interfaces.model.CausalLM` over :class:`DecoderModel`.

    Subclasses implement ``build_layer``; ``weight_renames`` (substring replacements) and
    ``weight_rules`` (fused parameters, checked in order) map checkpoint names.
    ``logits_scaling`` divides the logits (Granite's ``logits_scaling``);
    ``head_input_scaling`` divides the final hidden states before the LM head (MiniCPM's
    ``hidden_size / dim_model_base``). ``attention_requirements`` reads the config's usual
    fields (:func:`~tessellm.interfaces.model.config_attention_requirements`); a family
    whose attention differs overrides it.
    """

    weight_rules: ClassVar[tuple[WeightRule, ...]] = QKV_GATE_UP_RULES
    weight_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        *,
        logits_scaling: float | None = None,
        head_input_scaling: float | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.logits_scaling = _multiplier(logits_scaling)
        self.head_input_scaling = _multiplier(head_input_scaling)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.model = self.build_model(config, ctx)
        # The head maps onto the vocabulary from the embedding's width (narrower than
        # hidden_size where a family projects between them, as OPT-350m does).
        embed = self.model.embed_tokens
        embed_width = config.hidden_size if embed is None else embed.weight.shape[1]
        # Only the last pipeline stage computes logits.
        self.lm_head = (
            ParallelLMHead(config.vocab_size, embed_width, ctx) if is_last_stage(ctx) else None
        )
        if self.tied and self.lm_head is not None:
            self.lm_head.tie_to(embed)

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        """The body (anything with an ``embed_tokens`` embedding); a :class:`DecoderModel`
        of ``build_layer``'s layers unless a family overrides it."""
        return DecoderModel(config, ctx, lambda i: self.build_layer(config, ctx, i))

    @abstractmethod
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        """Decoder layer ``layer_idx`` (usually a :class:`DecoderLayer`)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if inputs_embeds is None:  # keeps the traced graphs of text steps as they were
            return self.model(input_ids, positions, metadata)
        return self.model(input_ids, positions, metadata, inputs_embeds)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """What ``forward`` embeds ``input_ids`` to (a vision-language family's language
        model: ``interfaces.multimodal``)."""
        return self.model.embed(input_ids)

    def get_input_embeddings(self) -> nn.Module:
        """The token embedding, which an EAGLE head shares (``HiddenStatesSource``)."""
        return self.model.embed_tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_input_scaling is not None:
            hidden = hidden / self.head_input_scaling
        logits = self.lm_head(hidden)
        if self.logits_scaling is not None:
            logits = logits / self.logits_scaling
        return logits

    def skip_weight(self, name: str) -> bool:
        """Checkpoint entries that are not parameters here (cached rotary tables, a tied
        head's copy of the embedding)."""
        return "rotary_emb.inv_freq" in name or (self.tied and name == "lm_head.weight")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = load_by_rules(
            self, weights, self.weight_rules, self.weight_renames, self.skip_weight
        )
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded
