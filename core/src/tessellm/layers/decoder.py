"""The pre-norm decoder most families share, with its options as arguments.

Grouped-query attention with rotary positions (optional q/k/v and output biases, optional
per-head q/k RMSNorm, a per-layer sliding window), a gated MLP or any other MLP module,
RMSNorm before each sub-layer, and an LM head that may be tied to the embedding. A family
subclasses :class:`DecoderForCausalLM`, says in ``build_layer`` how its layer ``i`` is
made, and states its checkpoint names as ``weight_rules`` / ``weight_renames``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ModelContext
from tessellm.interfaces.ops import FusedOps
from tessellm.layers.activation import GatedActivation
from tessellm.layers.attention import Attention
from tessellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tessellm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from tessellm.layers.norm import RMSNorm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.layers.scaled_embedding import ScaledVocabEmbedding
from tessellm.layers.weight_loading import QKV_GATE_UP_RULES, WeightRule, load_by_rules


def layer_sliding_window(config: Any, layer_idx: int) -> int | None:
    """The window layer ``layer_idx`` attends over, as transformers decides it.

    Configs with ``layer_types`` (Qwen2/Qwen3 derive it from ``max_window_layers``; Gemma
    alternates) window only their ``"sliding_attention"`` layers; otherwise every layer
    uses ``sliding_window`` unless ``use_sliding_window`` is false.
    """
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return int(window)


class DecoderAttention(nn.Module):
    """Self-attention with grouped KV heads and rotary positions."""

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        *,
        sliding_window: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        rotary: nn.Module | None = None,
        scale: float | None = None,
        logits_soft_cap: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        """``rotary`` replaces the full-head default table (partial rotary, per-layer-type
        bases, a table shared by layers); ``scale`` the ``head_size ** -0.5`` score scale;
        ``norm_offset`` is the q/k norms' weight offset (1 for Gemma's ``1 + weight``)."""
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.head_size = head_size
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_size, heads, kv_heads, ctx, bias=qkv_bias
        )
        self.o_proj = RowParallelLinear(heads * head_size, config.hidden_size, ctx, bias=o_bias)
        # Qwen3's per-head norms: one weight of head_size shared by all heads.
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(head_size, eps, ctx.dtype, norm_offset) if qk_norm else None
        self.k_norm = RMSNorm(head_size, eps, ctx.dtype, norm_offset) if qk_norm else None
        if rotary is None:
            rotary = RotaryEmbedding(config, head_size, config.max_position_embeddings)
        self.rotary_emb = rotary
        self.attn = Attention(
            self.qkv_proj.num_heads,
            head_size,
            head_size**-0.5 if scale is None else scale,
            self.qkv_proj.num_kv_heads,
            ctx,
            sliding_window=sliding_window,
            logits_soft_cap=logits_soft_cap,
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(hidden), metadata)

    def attend(
        self, positions: torch.Tensor, qkv: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """Everything after the q/k/v projection (``qkv`` is its output)."""
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        num_tokens = qkv.shape[0]
        if self.q_norm is not None and self.k_norm is not None:
            # Rows of one head each: the 2-D shape a fused norm kernel expects.
            q = self.q_norm(q.reshape(-1, self.head_size))
            k = self.k_norm(k.reshape(-1, self.head_size))
        q = q.reshape(num_tokens, -1, self.head_size)
        k = k.reshape(num_tokens, -1, self.head_size)
        # The attention layer rotates q and k (with the KV store, where a kernel fuses them).
        out = self.attn(q, k, v, metadata, positions=positions, rotary=self.rotary_emb)
        return self.o_proj(out)


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused in one column-parallel matrix."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        ctx: ModelContext,
        activation: str = "silu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], ctx, bias=bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, ctx, bias=bias)
        self.act = GatedActivation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.fused_ops
        if ops is not None and ops.linear_silu_and_mul is not None and self.act.is_silu:
            act = ops.linear_silu_and_mul(self.gate_up_proj, x)
            if act is not None:
                return self.down_proj(act)
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """RMSNorm → attention → residual → RMSNorm → MLP → residual (the adds fused in the
    norms: ``forward`` passes the residual stream along separately).

    With a :class:`DecoderAttention` and a :class:`GatedMLP`, a fused-op table's
    ``rms_norm_linear`` may fold each norm into the projection after it (and the SiLU into
    the gate/up projection); where it declines, the modules run one by one."""

    fused_ops: FusedOps | None = None  # bound by the model runner (interfaces/ops.py)

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        self_attn: nn.Module,
        mlp: nn.Module,
        norm_offset: float = 0.0,
    ):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ctx.dtype, norm_offset)

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
        if norm_linear is not None and isinstance(attn, DecoderAttention):
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
        if norm_linear is not None and isinstance(mlp, GatedMLP):
            assert ops is not None
            # The SiLU goes into the same kernel where the table offers that epilogue.
            silu = mlp.act.is_silu and ops.linear_silu_and_mul is not None
            fused = norm_linear(
                self.post_attention_layernorm, mlp.gate_up_proj, hidden, residual, silu
            )
            if fused is not None:
                out, residual = fused
                return mlp.down_proj(out if silu else mlp.act(out)), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return mlp(hidden), residual


class DecoderModel(nn.Module):
    """Embedding, ``num_hidden_layers`` layers from ``build_layer(i)``, final RMSNorm.

    ``embed_scale`` multiplies the embedding (Gemma: ``sqrt(hidden_size)``);
    ``norm_offset`` is the final norm's weight offset (Gemma: 1)."""

    def __init__(
        self,
        config: Any,
        ctx: ModelContext,
        build_layer: Callable[[int], nn.Module],
        embed_scale: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        super().__init__()
        vocab, hidden = config.vocab_size, config.hidden_size
        self.embed_tokens = (
            VocabParallelEmbedding(vocab, hidden, ctx)
            if embed_scale is None
            else ScaledVocabEmbedding(vocab, hidden, ctx, embed_scale)
        )
        self.layers = nn.ModuleList(build_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps, ctx.dtype, norm_offset)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DecoderForCausalLM(nn.Module, ABC):
    """A :class:`tessellm.interfaces.model.CausalLM` over :class:`DecoderModel`.

    Subclasses implement ``build_layer``; ``weight_renames`` (substring replacements) and
    ``weight_rules`` (fused parameters, checked in order) map checkpoint names.
    """

    weight_rules: ClassVar[tuple[WeightRule, ...]] = QKV_GATE_UP_RULES
    weight_renames: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.config = config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.model = self.build_model(config, ctx)
        # The head maps onto the vocabulary from the embedding's width (narrower than
        # hidden_size where a family projects between them, as OPT-350m does).
        embed_width = self.model.embed_tokens.weight.shape[1]
        self.lm_head = ParallelLMHead(config.vocab_size, embed_width, ctx)
        if self.tied:
            self.lm_head.tie_to(self.model.embed_tokens)

    def build_model(self, config: Any, ctx: ModelContext) -> nn.Module:
        """The body (anything with an ``embed_tokens`` embedding); a :class:`DecoderModel`
        of ``build_layer``'s layers unless a family overrides it."""
        return DecoderModel(config, ctx, lambda i: self.build_layer(config, ctx, i))

    @abstractmethod
    def build_layer(self, config: Any, ctx: ModelContext, layer_idx: int) -> nn.Module:
        """Decoder layer ``layer_idx`` (usually a :class:`DecoderLayer`)."""

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

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
