"""Triton paged attention on a real GPU, at sizes the interpreter cannot afford: larger
mixed batches in every dtype, split decode over long contexts, no host syncs in a step,
and CUDA-graph replay. The shared cases and checks live in ``test_attention_triton``."""

from __future__ import annotations

import pytest
import torch
from test_attention_triton import (
    DEVICE,
    FEATURES,
    MIXED,
    Batch,
    _check,
    gpu,
)

from tessellm.interfaces.attention import AttentionMetadata
from tessellm_attention_triton.backend import EXTRA_KEY, TritonPagedAttention

# ---------------------------------------------------------------- GPU, larger shapes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("head_size", "block_size", "feature"),
    [(128, 16, "plain"), (96, 32, "both"), (256, 16, "window"), (80, 32, "wide")],
)
def test_gpu_mixed_batch(dtype, head_size, block_size, feature):
    g = torch.Generator().manual_seed(1)
    seqs = [(int(c), 1) for c in torch.randint(1, 3000, (24,), generator=g)]
    seqs += [(0, 700), (1500, 333), (17, 129), (0, 1)]
    b = Batch(
        seqs,
        block_size=block_size,
        num_heads=32,
        num_kv_heads=8,
        head_size=head_size,
        dtype=dtype,
    )
    kw = {"scale": head_size**-0.5, **FEATURES[feature]}
    _check(b.triton(**kw), b.reference(**kw), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("feature", ["plain", "both", "wide"])
def test_gpu_split_decode(dtype, feature):
    seqs = [(8000, 1), (4095, 1), (1, 1), (300, 1)]
    b = Batch(seqs, block_size=16, num_heads=28, num_kv_heads=4, head_size=128, dtype=dtype)
    backend = TritonPagedAttention(b.spec)
    kw = {"scale": 128**-0.5, **FEATURES[feature]}
    out = b.triton(backend, **kw)
    assert b.metadata.extra[EXTRA_KEY].num_splits > 1
    _check(out, b.reference(**kw), dtype)


@pytest.mark.gpu
@gpu
def test_gpu_steps_do_not_sync_with_the_host():
    b = Batch(MIXED, block_size=16, num_heads=8, num_kv_heads=2, head_size=128)
    backend = TritonPagedAttention(b.spec)
    key = torch.randn(len(b.query), 2, 128, device=DEVICE)

    def step() -> torch.Tensor:
        backend.prepare(b.metadata)
        backend.write_kv(key, key, b.k_cache, b.v_cache, b.metadata)
        return backend.forward(b.query, b.k_cache, b.v_cache, b.metadata, scale=0.1)

    step()  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_gpu_graph_replay_with_longer_contexts():
    # The split count is planned from the captured step's max_seq_len; replaying the graph
    # with longer contexts must still cover every key.
    b = Batch(
        [(2500, 1), (40, 1), (1900, 1)],
        block_size=16,
        num_heads=8,
        num_kv_heads=2,
        head_size=128,
        dtype=torch.float16,
    )
    md = b.metadata
    short = torch.tensor([501, 30, 1201], dtype=torch.int32)
    captured = AttentionMetadata(
        md.query_start_loc,
        short.to(DEVICE),
        md.block_tables,
        md.slot_mapping,
        1,
        1201,
        md.query_start_loc_cpu,
        short,
    )
    backend = TritonPagedAttention(b.spec)
    backend.prepare(captured)
    assert captured.extra[EXTRA_KEY].num_splits > 1
    kw = {"scale": 128**-0.5, "sliding_window": 2000}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(b.query, b.k_cache, b.v_cache, captured, **kw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(b.query, b.k_cache, b.v_cache, captured, **kw)
    captured.seq_lens.copy_(md.seq_lens)
    graph.replay()
    torch.cuda.synchronize()
    _check(out, b.reference(**kw), torch.float16)
