"""Start-up forward passes: the profiling step on a scratch cache, and the eager warm-up.

Platforms that size the KV cache from free device memory (CUDA) need the peak memory of
a step before the cache exists. This builds such a step (``max_num_batched_tokens``
prompt tokens spread over up to ``max_num_seqs`` sequences), runs the model, the LM head
and a sort over the probabilities (the sampler's largest temporary) on it, and leaves
the model as it was. Every slot is ``-1``, so the scratch cache is never written.

The eager warm-up runs one small step per power-of-two class of the longest query, so
kernels that specialise on it compile before the server takes requests (see
``warm_eager_steps``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from tessellm.config import EngineArgs
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.lora.graph_inputs import LoRAGraphInputs

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner


def scheduled_token_budget(args: EngineArgs, max_model_len: int) -> int:
    """The most tokens one step computes (the scheduler's budget, as the engine sets it)."""
    budget = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
    if not args.enable_chunked_prefill:
        budget = max(budget, max_model_len)
    return budget


def profile_batch(
    num_tokens: int, num_seqs: int, max_model_len: int, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``num_tokens`` prompt tokens in ``num_seqs`` sequences of near-equal length."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    per_seq = min(max_model_len, -(-num_tokens // num_seqs))
    lens = [min(per_seq, num_tokens - i * per_seq) for i in range(num_seqs)]
    lens = [n for n in lens if n > 0]
    q_lens = torch.tensor(lens, dtype=torch.int32)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    torch.cumsum(q_lens, 0, out=cu[1:])
    total = int(cu[-1])
    positions = torch.cat([torch.arange(n) for n in lens])
    width = -(-max(lens) // block_size)
    metadata = AttentionMetadata(
        query_start_loc=cu.to(device),
        seq_lens=q_lens.to(device),
        block_tables=torch.zeros((len(lens), width), dtype=torch.int32, device=device),
        slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=cu,
        seq_lens_cpu=q_lens,
    )
    input_ids = torch.zeros(total, dtype=torch.int64, device=device)
    return input_ids, positions.to(device), metadata


def prepare_every_group(runner: ModelRunner, metadata: AttentionMetadata) -> None:
    """Plan ``metadata`` for the backend, and a copy of it for each further KV group.

    A synthetic step's groups all read the same (unwritten) block; each is planned on its
    own, as ``cache_binding.add_layout_metadata`` plans a real step's groups, since layers
    of a windowed group look their metadata up in ``kv_groups``.
    """
    groups = [
        dataclasses.replace(metadata, extra={}) for _ in range(len(runner.cache_layout.groups) - 1)
    ]
    for group in (metadata, *groups):
        runner.attention.prepare(group)
    metadata.kv_groups = tuple(groups)


@torch.inference_mode()
def profile_forward(runner: ModelRunner) -> None:
    """Run the largest step once on a one-block scratch cache, then rebind what was bound."""
    args = runner.args
    num_tokens = scheduled_token_budget(args, runner.max_model_len)
    input_ids, positions, metadata = profile_batch(
        num_tokens, args.max_num_seqs, runner.max_model_len, runner.block_size, runner.device
    )
    bound = [(layer.k_cache, layer.v_cache) for layer in runner.attn_layers]
    scratch: dict[tuple[int, int], torch.Tensor] = {}
    for layer in runner.attn_layers:
        key = (layer.num_kv_heads, layer.head_size)
        if key not in scratch:
            shape = (1, runner.block_size, *key)
            scratch[key] = torch.zeros(shape, dtype=runner.dtype, device=runner.device)
        layer.bind_kv_cache(scratch[key], scratch[key])
    try:
        prepare_every_group(runner, metadata)
        hidden = runner.model(input_ids, positions, metadata)
        last_rows = metadata.query_start_loc[1:].long() - 1
        probs = runner.model.compute_logits(hidden[last_rows]).float().softmax(dim=-1)
        probs.sort(dim=-1, descending=True)
    finally:
        for layer, (k_cache, v_cache) in zip(runner.attn_layers, bound, strict=True):
            layer.bind_kv_cache(k_cache, v_cache)


# Powers of two up to the widest query tile a kernel is known to pick (Triton prefill:
# 64 query rows over the GQA group); longer queries share the largest class.
EAGER_WARM_QUERY_LENS = (2, 4, 8, 16, 32, 64)


@torch.inference_mode()
def warm_eager_steps(runner: ModelRunner) -> list[int]:
    """Run one one-sequence eager step per query length of ``EAGER_WARM_QUERY_LENS``.

    JIT kernels choose compile-time tile shapes from the step's longest query (Triton's
    prefill attention: its next power of two, capped), and compile each variant the first
    time a step needs it: on an H100 0.3-0.5 s each, paid by the requests of the first
    mixed step with a short longest query (a prompt's last chunk, a prefix-cache hit,
    a speculative verification) after start-up. Slots are ``-1``: nothing is written to
    the KV cache. Returns the query lengths run.
    """
    limit = min(scheduled_token_budget(runner.args, runner.max_model_len), runner.max_model_len)
    lengths = [n for n in EAGER_WARM_QUERY_LENS if n <= limit]
    # With LoRA kernels, an adapted step's row tile follows a slot's token count: each
    # length runs again with every layer's kernels over tokens of no adapter (no change).
    lora = LoRAGraphInputs.of(runner.model, max(lengths), runner.device) if lengths else None
    if runner.lora is not None:
        runner.lora.clear()  # the plain runs: no adapter (a former step's layout is stale)
    for num_tokens in lengths:
        input_ids, positions, metadata = profile_batch(
            num_tokens, 1, runner.max_model_len, runner.block_size, runner.device
        )
        prepare_every_group(runner, metadata)
        runner.model(input_ids, positions, metadata)
        if lora is not None:
            with lora.capturing(num_tokens):
                runner.model(input_ids, positions, metadata)
    return lengths
