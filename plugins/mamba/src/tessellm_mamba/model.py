"""Mamba2ForCausalLM: embedding, ``num_hidden_layers`` of (RMSNorm -> Mamba2 mixer ->
residual), final RMSNorm, LM head; the mixers' conv and SSM states live in the engine's
recurrent-state slots (``tessellm.interfaces.cache_spec``), one per running request.

A step's batch is packed (``[num_tokens, hidden]``); a decode-only step (one token per
sequence) runs the one-step update over the batch, any other step the chunked scan over
the batch right-padded to its longest chunk (``ssm.py``). A sequence whose chunk starts at
position 0 starts from zero states; any other continues from its slot's.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.errors import ModelLoadError
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import LayerCacheSpec, RecurrentStateSpec, StatefulLayer
from tessellm.interfaces.model import AttentionRequirements, ModelContext
from tessellm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tessellm.layers.linear import ColumnParallelLinear
from tessellm.layers.weight_loading import load_by_rules
from tessellm_mamba.ssm import causal_conv, chunked_scan, step_update


class Mamba2Mixer(StatefulLayer):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.d_state, self.groups = config.state_size, config.n_groups
        self.inner = int(config.expand * config.hidden_size)
        self.kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.dt_limit = tuple(config.time_step_limit)
        self.conv_dim = self.inner + 2 * self.groups * self.d_state
        hidden, dtype = config.hidden_size, ctx.dtype
        self.in_proj = ColumnParallelLinear(
            hidden, self.inner + self.conv_dim + self.heads, ctx, bias=config.use_bias
        )
        self.out_proj = ColumnParallelLinear(self.inner, hidden, ctx, bias=config.use_bias)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)

        self.conv1d = nn.Module()
        self.conv1d.weight = param(self.conv_dim, 1, self.kernel)
        self.conv1d.bias = param(self.conv_dim) if config.use_conv_bias else None
        self.dt_bias, self.A_log, self.D = param(self.heads), param(self.heads), param(self.heads)
        self.norm = nn.Module()
        self.norm.weight = param(self.inner)
        self.eps = config.layer_norm_epsilon
        self.state_spec = mixer_state_spec(config)

    def _gated_norm(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        y = y.float() * F.silu(gate.float())
        grouped = y.view(y.shape[0], self.groups, -1)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.norm.weight * grouped.view_as(y).to(gate.dtype)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        proj = self.in_proj(hidden)
        gate, xbc, dt = proj.split([self.inner, self.conv_dim, self.heads], dim=-1)
        qsl = metadata.query_start_loc_cpu.tolist()
        q_lens = [end - start for start, end in itertools.pairwise(qsl)]
        starts = (metadata.seq_lens - metadata.query_start_loc.diff()).to(torch.int64)
        slots = metadata.state_slots
        conv_state, ssm_state = self.state if slots is not None else (None, None)
        batch, longest = len(q_lens), max(q_lens)
        # Each sequence's states (zeros for a new one, or without slots: a scratch pass).
        fresh = (starts == 0) if slots is not None else None
        if slots is None:
            history = xbc.new_zeros(batch, self.conv_dim, self.kernel - 1)
            state = torch.zeros(batch, self.heads, self.head_dim, self.d_state, device=xbc.device)
        else:
            keep = (~fresh).to(conv_state.dtype)
            history = conv_state[slots] * keep[:, None, None]
            state = ssm_state[slots].float() * keep.float()[:, None, None, None]
        a = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight[:, 0, :]
        if longest == 1:  # decodes only: one step each
            conved, full = causal_conv(xbc[:, :, None], history, weight, self.conv1d.bias)
            x, b, c = self._split(conved[:, :, 0].float())
            y, state = step_update(
                state,
                x.view(batch, self.heads, self.head_dim),
                self._dt(dt.float()),
                a,
                self._by_head(b),
                self._by_head(c),
                self.D.float(),
            )
            y = y.reshape(batch, self.inner)
            new_history = full[:, :, 1:]
        else:
            y, state, new_history = self._prefill(xbc, dt, q_lens, history, state, weight, a)
        if slots is not None:
            conv_state[slots] = new_history.to(conv_state.dtype)
            ssm_state[slots] = state.to(ssm_state.dtype)
        return self.out_proj(self._gated_norm(y.to(hidden.dtype), gate))

    def _prefill(self, xbc, dt, q_lens, history, state, weight, a):
        batch, longest = len(q_lens), max(q_lens)
        device = xbc.device
        lengths = torch.tensor(q_lens, device=device)
        real = torch.arange(longest, device=device)[None, :] < lengths[:, None]
        # The packed rows of each (sequence, position) of the padded batch.
        rows = torch.zeros(batch, longest, dtype=torch.int64, device=device)
        rows[real] = torch.arange(xbc.shape[0], device=device)
        padded = xbc[rows] * real[..., None].to(xbc.dtype)  # [batch, L, conv_dim]
        conved, full = causal_conv(padded.transpose(1, 2), history, weight, self.conv1d.bias)
        # Next history: the K - 1 inputs up to each sequence's last real token.
        take = lengths[:, None] + torch.arange(self.kernel - 1, device=device)[None, :]
        new_history = full.gather(2, take[:, None, :].expand(-1, self.conv_dim, -1))
        x, b, c = self._split(conved.transpose(1, 2).float())
        dts = self._dt(dt[rows].float()) * real[..., None]  # dt = 0 at padding
        y, state = chunked_scan(
            x.reshape(batch, longest, self.heads, self.head_dim),
            dts,
            a,
            self._by_head(b),
            self._by_head(c),
            self.D.float(),
            state,
            self.chunk_size,
        )
        return y.reshape(batch, longest, self.inner)[real], state, new_history

    def _split(self, xbc: torch.Tensor):
        n = self.groups * self.d_state
        return xbc.split([self.inner, n, n], dim=-1)

    def _by_head(self, t: torch.Tensor) -> torch.Tensor:
        """``[..., groups * d_state]`` -> ``[..., heads, d_state]`` (heads share groups)."""
        t = t.unflatten(-1, (self.groups, self.d_state))
        return t.repeat_interleave(self.heads // self.groups, dim=-2)

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt + self.dt_bias.float())
        return dt.clamp(self.dt_limit[0], self.dt_limit[1])


def mixer_state_spec(config: Any) -> RecurrentStateSpec:
    inner = int(config.expand * config.hidden_size)
    conv_dim = inner + 2 * config.n_groups * config.state_size
    return RecurrentStateSpec(
        (
            (conv_dim, config.conv_kernel - 1),
            (config.num_heads, config.head_dim, config.state_size),
        ),
        dtype=None,
    )


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Mamba2Block(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.dtype)
        self.mixer = Mamba2Mixer(config, ctx)
        self.residual_in_fp32 = bool(config.residual_in_fp32)

    def forward(self, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        return (residual + self.mixer(self.norm(hidden), metadata)).to(hidden.dtype)


class Mamba2Model(nn.Module):
    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx)
        self.layers = nn.ModuleList(
            Mamba2Block(config, ctx) for _ in range(config.num_hidden_layers)
        )
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon, ctx.dtype)

    def forward(self, input_ids: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, metadata)
        return self.norm_f(hidden)


class Mamba2ForCausalLM(nn.Module):
    """transformers' ``Mamba2ForCausalLM`` (checkpoint names ``backbone.*``, ``lm_head``)."""

    @classmethod
    def attention_requirements(cls, config: Any) -> AttentionRequirements:
        # No attention layer: any backend will do (it is chosen, never called).
        return AttentionRequirements(head_size=64, num_heads=1, num_kv_heads=1)

    @classmethod
    def cache_specs(cls, config: Any) -> list[LayerCacheSpec]:
        return [mixer_state_spec(config)] * config.num_hidden_layers

    def __init__(self, config: Any, ctx: ModelContext) -> None:
        super().__init__()
        if ctx.parallel.world_size > 1:
            raise ModelLoadError("Mamba2ForCausalLM runs without tensor parallelism for now")
        self.config = config
        self.backbone = Mamba2Model(config, ctx)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if self.tied:
            self.lm_head.tie_to(self.backbone.embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        return self.backbone(input_ids, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = load_by_rules(
            self,
            weights,
            renames=(("backbone.embedding.", "backbone.embeddings."),),
            skip=lambda name: self.tied and name == "lm_head.weight",
        )
        if self.tied:
            loaded.add("lm_head.weight")
        return loaded
