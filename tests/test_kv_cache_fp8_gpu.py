"""fp8 KV cache on a real GPU: the Triton kernels at sizes the interpreter cannot afford,
against the torch reference over the same fp8 cache and against a bf16 cache; the write
kernel's rounding compiled; the engine with CUDA graphs. The shared helpers live in
``test_kv_cache_fp8``."""

from __future__ import annotations

import pytest
import torch
from test_attention_triton import FEATURES, Batch, gpu
from test_kv_cache_fp8 import (
    E4M3,
    E5M2,
    FORMAT_IDS,
    NUM_BLOCKS,
    PROMPT,
    TRITON_FORMATS,
    fp8_batch,
    triton_backend,
)

from tessellm.config import EngineArgs
from tessellm.sampling_params import SamplingParams
from tessellm_attention_torch.backend import TorchPagedAttention

pytestmark = [pytest.mark.gpu, gpu]

# Attention outputs over an fp8 cache vs a bf16 one, measured with the torch reference on
# these batches (|out| up to 3.5; the worst rows attend to a single key, so they carry a
# value's own rounding): max 0.16 and mean 0.011 (e4m3), 0.34 and 0.022 (e5m2).
VS_BF16 = {E4M3: (0.25, 0.02), E5M2: (0.5, 0.04)}


def gpu_batches(fp8: torch.dtype):
    g = torch.Generator().manual_seed(1)
    mixed = [(int(c), 1) for c in torch.randint(1, 3000, (24,), generator=g)]
    mixed += [(0, 700), (1500, 333), (17, 129), (0, 1)]
    decode = [(8000, 1), (4095, 1), (1, 1), (300, 1)]
    shape = {"block_size": 16, "num_heads": 32, "num_kv_heads": 8, "head_size": 128}
    for seqs in (mixed, decode):
        yield (
            fp8_batch(seqs, fp8, dtype=torch.bfloat16, **shape),
            Batch(seqs, dtype=torch.bfloat16, **shape),
        )


@pytest.mark.parametrize(("fp8", "native"), TRITON_FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("feature", ["plain", "both"])
def test_gpu_triton_over_fp8_matches_the_reference_and_stays_near_bf16(fp8, native, feature):
    for b, dense in gpu_batches(fp8):
        kw = {"scale": 128**-0.5, **FEATURES[feature]}
        scales = {"k_scale": b.k_scale, "v_scale": b.v_scale}
        backend = triton_backend(b.spec, native)
        backend.prepare(b.metadata)
        got = backend.forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw, **scales)
        ref = TorchPagedAttention(b.spec)
        want = ref.forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw, **scales)
        assert not got.isnan().any()
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
        bf16 = dense.triton(**kw)
        error = (got.float() - bf16.float()).abs()
        most, mean = VS_BF16[fp8]
        assert error.max() < most and error.mean() < mean


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_gpu_write_kv_rounds_as_torch_casts(fp8):
    # Every value halfway between two fp8 neighbours (ties to even, carries into the
    # exponent, subnormals), values out of range, and random ones.
    codes = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    codes = codes[codes.isfinite()].unique()
    ties = (codes[1:] + codes[:-1]) / 2
    limit = float(codes.max())
    extra = torch.tensor([2 * limit, -2 * limit, 0.0, -0.0])
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * limit / 16
    values = torch.cat([ties, ties.nextafter(torch.tensor(0.0)), extra, noise])
    rows = -(-len(values) // 128)
    key = torch.zeros(rows * 128).index_copy_(0, torch.arange(len(values)), values)
    key = key.view(rows, 1, 128).cuda()
    caches = [torch.zeros((rows, 1, 1, 128), dtype=fp8, device="cuda") for _ in "kv"]
    from tessellm_attention_triton.kernels.write_kv import write_kv

    write_kv(key, key, *caches, torch.arange(rows, device="cuda"))
    want = key.clamp(-limit, limit).to(fp8).view(torch.uint8)
    assert torch.equal(caches[0].view(rows, 1, 128).view(torch.uint8), want)


def test_gpu_engine_fp8_cache_with_cuda_graphs(tmp_path):
    from tessellm.engine.llm_engine import LLMEngine
    from tessellm.testing import tiny_model

    # Head size 32: the Triton backend serves 32 and up (the CPU tests' tiny model has 16).
    llama = tiny_model("LlamaForCausalLM", tmp_path / "llama", hidden_size=128, head_dim=32)

    def generate(kv_cache_dtype: str, eager: bool) -> tuple[list[int], float]:
        args = EngineArgs(
            model=str(llama),
            device="cuda",
            dtype="bfloat16",
            attention_backend="triton",
            kv_cache_dtype=kv_cache_dtype,
            enforce_eager=eager,
            num_gpu_blocks_override=NUM_BLOCKS,
            download_dir=str(llama.parent / "cache"),
        )
        engine = LLMEngine(args)
        try:
            params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=1)
            engine.add_request("0", PROMPT, params)
            done = []
            while engine.has_unfinished_requests():
                done += [out for out in engine.step() if out.finished]
            completion = done[0].outputs[0]
            first = completion.logprobs[0][completion.token_ids[0]]
            return list(completion.token_ids), first.logprob
        finally:
            engine.shutdown()

    eager_tokens, eager_logprob = generate("fp8", eager=True)
    graph_tokens, graph_logprob = generate("fp8", eager=False)
    assert graph_tokens == eager_tokens and graph_logprob == pytest.approx(eager_logprob, abs=1e-3)
    _, dense_logprob = generate("auto", eager=True)
    assert eager_logprob == pytest.approx(dense_logprob, abs=0.2)
