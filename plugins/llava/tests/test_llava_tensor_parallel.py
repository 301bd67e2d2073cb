"""LLaVA at tensor-parallel size 2 (mp workers over gloo on the CPU): the plan's images
travel to both ranks, the projector and the language model are sharded, the vision tower
is replicated; the tokens are transformers'."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm_llava.testing import hf_llava_greedy, sample_images, tiny_llava

pytestmark = pytest.mark.slow

MAX_TOKENS = 6


def test_llava_tensor_parallel_matches_hf(tmp_path):
    path = tiny_llava(tmp_path / "tiny", seed=2)
    images = sample_images(3, seed=7)
    prompts = [
        ("Hello, my name is <image>\nThe capital of France is", [images[0]]),
        ("<image> The quick brown fox <image> A", [images[1], images[2]]),
        ("The capital of France is", []),
    ]
    _, expected = hf_llava_greedy(path, prompts, MAX_TOKENS)
    llm = LLM(
        model=str(path),
        dtype="float32",
        device="cpu",
        tensor_parallel_size=2,
        download_dir=str(tmp_path),
        max_num_batched_tokens=12,  # chunks that split the images
    )
    try:
        inputs = [
            {"prompt": t, "multi_modal_data": {"image": im}} if im else t for t, im in prompts
        ]
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        outs = llm.generate(inputs, params)
        assert [o.outputs[0].token_ids for o in outs] == expected
    finally:
        llm.engine.shutdown()
