"""The Mamba2 mixer, shared by Mamba2 and the attention+SSM hybrids: in-projection,
depthwise causal conv, SSD scan, gated RMSNorm, out-projection, with its conv and SSM
states in the engine's recurrent-state slots (``tessellm.interfaces.cache_spec``).

A step's batch is packed (``[num_tokens, hidden]``); a decode-only step (one token per
sequence) runs the one-step update over the batch, any other step the chunked scan over
the batch right-padded to its longest chunk (``ssm.py``). A sequence whose chunk starts at
position 0 starts from zero states; any other continues from its slot's.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.cache_spec import RecurrentStateSpec, StatefulLayer
from tessellm.interfaces.model import ModelContext
from tessellm.layers.linear import ColumnParallelLinear
from tessellm_mamba.ssm import causal_conv, chunked_scan, step_update


@dataclass(frozen=True, slots=True)
class MixerDims:
    """A Mamba2 mixer's sizes (Mamba2 and the hybrids name them differently)."""

    hidden: int
    heads: int
    head_dim: int
    d_state: int
    groups: int
    inner: int
    kernel: int
    chunk_size: int
    dt_limit: tuple[float, float]
    proj_bias: bool
    conv_bias: bool
    eps: float

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.groups * self.d_state

    def state_spec(self) -> RecurrentStateSpec:
        """The conv state (the last ``K - 1`` inputs) and the SSM state, per request."""
        shapes = ((self.conv_dim, self.kernel - 1), (self.heads, self.head_dim, self.d_state))
        return RecurrentStateSpec(shapes)

    @classmethod
    def of_mamba2(cls, config: Any) -> MixerDims:
        return cls(
            config.hidden_size,
            config.num_heads,
            config.head_dim,
            config.state_size,
            config.n_groups,
            int(config.expand * config.hidden_size),
            config.conv_kernel,
            config.chunk_size,
            tuple(config.time_step_limit),
            bool(config.use_bias),
            bool(config.use_conv_bias),
            config.layer_norm_epsilon,
        )


class Mamba2Mixer(StatefulLayer):
    def __init__(self, dims: MixerDims, ctx: ModelContext) -> None:
        super().__init__()
        self.heads, self.head_dim = dims.heads, dims.head_dim
        self.d_state, self.groups = dims.d_state, dims.groups
        self.inner, self.kernel, self.chunk_size = dims.inner, dims.kernel, dims.chunk_size
        self.dt_limit = dims.dt_limit
        self.conv_dim = dims.conv_dim
        hidden, dtype = dims.hidden, ctx.dtype
        self.in_proj = ColumnParallelLinear(
            hidden, self.inner + self.conv_dim + self.heads, ctx, bias=dims.proj_bias
        )
        self.out_proj = ColumnParallelLinear(self.inner, hidden, ctx, bias=dims.proj_bias)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)

        self.conv1d = nn.Module()
        self.conv1d.weight = param(self.conv_dim, 1, self.kernel)
        self.conv1d.bias = param(self.conv_dim) if dims.conv_bias else None
        self.dt_bias, self.A_log, self.D = param(self.heads), param(self.heads), param(self.heads)
        self.norm = nn.Module()
        self.norm.weight = param(self.inner)
        self.eps = dims.eps
        self.state_spec = dims.state_spec()

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
        batch, longest = len(q_lens), max(q_lens)
        slots = metadata.state_slots
        # The states each sequence starts from (read from the host-side lengths: no
        # device sync): zeros for one whose chunk starts at position 0, and on a scratch
        # pass (no slots).
        starts = metadata.seq_lens_cpu - metadata.query_start_loc_cpu.diff()
        fresh = starts == 0
        if slots is None:
            history = xbc.new_zeros(batch, self.conv_dim, self.kernel - 1)
            state = torch.zeros(batch, self.heads, self.head_dim, self.d_state, device=xbc.device)
        else:
            conv_state, ssm_state = self.state
            # (Advanced indexing: torch's CPU index_select was ~15x slower on these rows.)
            history = conv_state[slots]
            state = ssm_state[slots].float()
            if bool(fresh.any()):
                keep = (~fresh).to(device=xbc.device)
                history.mul_(keep.to(history.dtype)[:, None, None])
                state.mul_(keep.to(state.dtype)[:, None, None, None])
        a = -torch.exp(self.A_log.float())
        weight = self.conv1d.weight[:, 0, :]
        if longest == 1:  # decodes only: one step each, the state updated in place
            full = torch.cat([history, xbc[:, :, None].to(history.dtype)], dim=-1)
            conved = torch.einsum("bck,ck->bc", full, weight)
            if self.conv1d.bias is not None:
                conved = conved + self.conv1d.bias
            x, b, c = self._split(F.silu(conved).float())
            y = step_update(
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
            conv_state.index_copy_(0, slots, new_history.to(conv_state.dtype))
            ssm_state.index_copy_(0, slots, state.to(ssm_state.dtype))
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
            # The scan is exact for any chunk length: no longer than the longest row, so a
            # batch of short chunks is not padded up to the model's chunk size.
            min(self.chunk_size, longest),
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
