"""The Mamba2 (SSD) scan in plain torch: the chunked form for prompts, the one-step update
for decodes, both over a batch of sequences of different lengths.

Per head ``h`` the state ``S`` (``head_dim x d_state``) evolves as
``S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t B_t^T`` and the output is
``y_t = S_t C_t + D_h * x_t``. The chunked form (Dao & Gu's state space duality, as
transformers' torch path computes it) is exact, and batched: a batch of unequal lengths is
right-padded with ``dt = 0``, which leaves the state unchanged (``exp(0) = 1``, nothing
added), so each row's final state is its state after its last real token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """``out[..., i, j] = sum(x[..., j + 1 : i + 1])`` for ``i >= j``, ``-inf`` above the
    diagonal: log-decays between positions of a chunk, stable (no subtraction of sums)."""
    t = x.shape[-1]
    x = x[..., None].expand(*x.shape, t)
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=0)
    return sums.masked_fill(~keep, -torch.inf)


def chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
    initial_state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[batch, L, heads, head_dim]``, ``dt`` ``[batch, L, heads]`` (after softplus
    and clamping; 0 at padding), ``a``/``d`` ``[heads]``, ``b``/``c`` ``[batch, L, heads,
    d_state]``, ``initial_state`` ``[batch, heads, head_dim, d_state]``; fp32 throughout.
    Returns ``y`` ``[batch, L, heads, head_dim]`` and the final states."""
    batch, length, heads, head_dim = x.shape
    pad = (-length) % chunk_size
    skip = d[:, None] * x
    if pad:
        x, dt, b, c = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, b, c))
    chunks = x.shape[1] // chunk_size

    def by_chunk(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    xdt = by_chunk(x * dt[..., None])
    b, c = by_chunk(b), by_chunk(c)
    adt = by_chunk(a * dt).permute(0, 3, 1, 2)  # [batch, heads, chunks, chunk_size]
    a_cumsum = torch.cumsum(adt, dim=-1)
    # Within each chunk: attention-like scores C_l . B_s decayed from s to l.
    decay = torch.exp(segment_sum(adt))
    scores = torch.einsum("bclhn,bcshn->bhcls", c, b) * decay
    y_diag = torch.einsum("bhcls,bcshp->bclhp", scores, xdt)
    # Each chunk's contribution to the state at its end.
    to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, to_end, xdt)
    # Across chunks: the state entering each chunk, from the initial state on.
    states = torch.cat([initial_state[:, None], states], dim=1)
    across = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    entering, final = states[:, :-1], states[:, -1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, entering, torch.exp(a_cumsum))
    y = (y_diag + y_off).reshape(batch, -1, heads, head_dim)[:, :length]
    return y + skip, final


def step_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    d: torch.Tensor,
) -> torch.Tensor:
    """One token per sequence, ``state`` ``[batch, heads, head_dim, d_state]`` (contiguous)
    updated in place; ``x`` ``[batch, heads, head_dim]``, ``dt`` ``[batch, heads]``,
    ``b``/``c`` ``[batch, heads, d_state]``. Returns ``y`` ``[batch, heads, head_dim]``.
    Two passes over the state (decay, then the rank-1 update as a batched ``baddbmm``)
    and one read for the output: decode is bound by the state's memory traffic."""
    batch, heads, head_dim, d_state = state.shape
    rows = state.view(batch * heads, head_dim, d_state)
    rows.mul_(torch.exp(dt * a).reshape(-1, 1, 1))
    dtx = (dt[..., None] * x).reshape(-1, head_dim, 1)
    rows.baddbmm_(dtx, b.reshape(-1, 1, d_state))
    y = torch.bmm(rows, c.reshape(-1, d_state, 1)).view(batch, heads, head_dim)
    return y + d[:, None] * x


def causal_conv(
    xbc: torch.Tensor, history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal convolution of right-padded ``xbc`` ``[batch, channels, L]`` after
    ``history`` ``[batch, channels, K - 1]`` (the inputs before it; zeros for a new
    sequence), ``weight`` ``[channels, K]``. Returns the outputs ``[batch, channels, L]``
    (SiLU applied) and the padded inputs with their history, ``[batch, channels, K-1+L]``,
    from which each row's next history is read."""
    full = torch.cat([history.to(xbc.dtype), xbc], dim=-1)
    out = F.conv1d(full, weight[:, None, :], bias, groups=weight.shape[0])
    return F.silu(out), full
