"""Template of an attention-backend plugin: paged attention in plain torch."""

from __future__ import annotations

DESCRIPTION = "Paged attention backend $name"
IMPL_MODULE = "backend"
IMPL_SUMMARY = (
    "`$class_name`, paged attention in plain torch (it gathers each sequence's keys and "
    "values through its block table) with its capabilities declared."
)
TEST_SUMMARY = (
    "the conformance check against tessellm's reference backend on random metadata "
    "(`check_attention_backend`) and greedy parity with HF transformers."
)
USAGE = """\
Use it: `tessellm generate --attention-backend $name ...`, `LLM(model, attention_backend="$name")`,
or list `"$name"` in a platform's `attention_backends` preference order.
"""

PLUGIN_IMPORTS = """\
from tessellm import hookimpl
"""

PLUGIN = """\


@hookimpl
def register_attention_backends(register):
    register(
        "$name",
        "$package.backend:$class_name",
    )
"""

IMPL = '''\
"""Paged attention in plain torch: each sequence's keys and values are gathered from the
KV cache through its block table, then attended to in fp32.

The cache layout and the batch packing are tessellm's contract
(``tessellm.interfaces.attention``): ``k_cache``/``v_cache`` are
``[num_blocks, block_size, num_kv_heads, head_size]``; sequence ``s``'s query rows are
``query_start_loc[s]:query_start_loc[s+1]`` and sit at the last positions of its context.
Replace ``forward`` with a faster kernel and keep ``capabilities`` truthful: the engine
chooses a backend by them, and ``check_attention_backend`` tests every one claimed.
"""

from __future__ import annotations

import torch
from tessellm.interfaces.attention import (
    AttentionBackend,
    AttentionCapabilities,
    AttentionMetadata,
)


def gather(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[seq_len, num_kv_heads, head_size]``: one sequence's cached keys or values."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


class $class_name(AttentionBackend):
    name = "$name"
    capabilities = AttentionCapabilities(
        device_types=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        head_sizes=None,  # any
        block_sizes=None,  # any
        sliding_window=True,
        logits_soft_cap=True,
    )

    def write_kv(self, key, value, k_cache, v_cache, metadata: AttentionMetadata) -> None:
        slots = metadata.slot_mapping
        keep = slots >= 0  # -1: a padding token, not stored
        slots, key, value = slots[keep], key[keep], value[keep]
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))

    def forward(
        self,
        query,
        k_cache,
        v_cache,
        metadata: AttentionMetadata,
        *,
        scale: float,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu.tolist()
        for seq, seq_len in enumerate(metadata.seq_lens_cpu.tolist()):
            lo, hi = starts[seq], starts[seq + 1]
            if hi == lo:
                continue
            keys = gather(k_cache, metadata.block_tables[seq], seq_len).float()
            values = gather(v_cache, metadata.block_tables[seq], seq_len).float()
            q = query[lo:hi].float()
            # Grouped-query attention: each KV head serves `group` query heads.
            group = q.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
            if logits_soft_cap:
                scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
            q_pos = torch.arange(seq_len - (hi - lo), seq_len, device=query.device)[:, None]
            k_pos = torch.arange(seq_len, device=query.device)[None, :]
            allowed = k_pos <= q_pos
            if sliding_window:
                allowed &= q_pos - k_pos < sliding_window
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
        return out
'''

TEST = '''\
"""Tests of this attention backend with tessellm's conformance kit (tessellm.testing)."""

from tessellm.testing import assert_greedy_parity, check_attention_backend, tiny_model

BACKEND = "$name"


def test_conforms_to_the_reference_backend():
    # Random paged metadata over every capability the backend declares (GQA ratios, block
    # and head sizes, sliding window, soft-cap), compared with the torch reference.
    result = check_attention_backend(BACKEND)
    assert result.skipped_reason is None, result.skipped_reason
    result.raise_for_failures()


def test_greedy_tokens_match_transformers(tmp_path):
    model = tiny_model("LlamaForCausalLM", tmp_path / "model")
    assert_greedy_parity(model, attention_backend=BACKEND)
'''
