"""LongRoPE (Phi-3 long-context models): two frequency sets, chosen by sequence length.

transformers rotates with the ``short_factor`` frequencies while a sequence's length is
at most ``original_max_position_embeddings`` and with the ``long_factor`` ones beyond;
keys already cached keep the rotation they were computed with. Here both tables sit in one
buffer (short rows first, long rows after), and :meth:`LongRopeRotaryEmbedding.table_positions`
turns positions into rows of it, so the plain (or fused) rotary code indexes the right set.
The choice is made per sequence from its length at this step, which is what the
reference does for one sequence at a time; a prompt split over several prefill chunks
switches at the chunk that crosses the limit rather than from its first token.
"""

from __future__ import annotations

from typing import Any

import torch

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.layers.rotary import RotaryEmbedding, rope_parameters


def is_longrope(config: Any) -> bool:
    return rope_parameters(config).get("rope_type") == "longrope"


class LongRopeRotaryEmbedding(RotaryEmbedding):
    def __init__(self, config: Any, head_size: int, max_position: int, rotary_dim: int) -> None:
        super().__init__(config, head_size, max_position, rotary_dim)  # the short-factor rows
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope = rope_parameters(config)
        self.original_max = int(
            rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
        )
        self.max_position = max_position
        long_inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](
            config, torch.device("cpu"), seq_len=self.original_max + 1
        )
        device = self.cos.device  # models are built under their device; inv_freq is on the CPU
        positions = torch.arange(max_position, dtype=torch.float32, device=device)
        freqs = torch.outer(positions, long_inv_freq.to(device=device, dtype=torch.float32))
        self.cos = torch.cat((self.cos, freqs.cos() * scaling))
        self.sin = torch.cat((self.sin, freqs.sin() * scaling))

    def table_positions(self, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        """Rows of the cos/sin tables for ``positions``: the long-factor half for tokens of
        sequences longer than the original context at this step."""
        token = torch.arange(positions.shape[0], device=positions.device, dtype=torch.int32)
        starts = metadata.query_start_loc[1:].to(torch.int32)
        seq = torch.searchsorted(starts, token, right=True).clamp_(max=starts.shape[0] - 1)
        long = metadata.seq_lens[seq] > self.original_max
        return positions + long.to(positions.dtype) * self.max_position
