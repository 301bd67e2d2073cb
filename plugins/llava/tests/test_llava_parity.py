"""LLaVA greedy parity with transformers (fp32, a tiny random model with 28-pixel images
of 16 rows each): one image, two images in a prompt, a batch of different images with a
text-only prompt mixed in, chunked prefill through an image, prefix-cache hits and
misses by image content, and preemption."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.testing.parity import preemption_layout
from tessellm_llava.testing import hf_llava_greedy, sample_images, tiny_llava

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The checkpoint, four images, the prompts and transformers' tokens for them."""
    path = tiny_llava(tmp_path_factory.mktemp("llava") / "tiny")
    images = sample_images(4)
    prompts = [
        ("Hello, my name is <image>\nThe capital of France is", [images[0]]),
        ("Hello, my name is <image>\nThe capital of France is", [images[1]]),
        ("<image> The quick brown fox <image> A", [images[2], images[3]]),
        ("The capital of France is", []),
        ("The quick brown fox <image>", [images[0]]),  # ends inside the image
    ]
    prompt_ids, expected = hf_llava_greedy(path, prompts, MAX_TOKENS)
    # The images matter: the same text with another image continues otherwise.
    assert expected[0] != expected[1]
    return path, prompts, prompt_ids, expected


def _llm(path, tmp_path, **kwargs) -> LLM:
    args = dict(dtype="float32", download_dir=str(tmp_path), enforce_eager=True, seed=0)
    return LLM(model=str(path), **{**args, **kwargs})


def _inputs(prompts):
    return [{"prompt": t, "multi_modal_data": {"image": im}} if im else t for t, im in prompts]


def _runner(llm: LLM):
    return llm.engine.executor.runner


def test_llava_batch_matches_hf(llava, tmp_path):
    """One image, another image, two images in one prompt and a text-only prompt, in one
    batch; then each alone. The prompt expands to the processor's token ids."""
    path, prompts, prompt_ids, expected = llava
    llm = _llm(path, tmp_path, enable_prefix_caching=False)
    outs = llm.generate(_inputs(prompts), GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompt_ids
    assert [o.outputs[0].token_ids for o in outs] == expected
    # Four images in the batch, each encoded once.
    assert _runner(llm).encoder_cache.encoded == 4
    for i in (2, 3):
        (alone,) = llm.generate(_inputs([prompts[i]]), GREEDY)
        assert alone.outputs[0].token_ids == expected[i]


def test_llava_chunked_prefill_splits_the_image(llava, tmp_path):
    """Chunks of 5 tokens cross each 16-row image over several steps: the encoder runs
    once per image, and the tokens are transformers'."""
    path, prompts, _, expected = llava
    llm = _llm(path, tmp_path, max_num_batched_tokens=5, enable_prefix_caching=False)
    outs = llm.generate(_inputs(prompts[:3]), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]
    runner = _runner(llm)
    assert runner.encoder_cache.encoded == 4
    assert not runner.encoder_cache.entries  # dropped once the prefill passed them


def test_llava_prefix_cache_keys_on_the_image(llava, tmp_path):
    """The same text and image hit the prefix cache; the same text with another image
    hits only the blocks before the image, and continues as transformers does."""
    path, prompts, prompt_ids, expected = llava
    llm = _llm(path, tmp_path, block_size=4)
    (first,) = llm.generate(_inputs([prompts[0]]), GREEDY)
    (again,) = llm.generate(_inputs([prompts[0]]), GREEDY)
    (other,) = llm.generate(_inputs([prompts[1]]), GREEDY)
    image_start = prompt_ids[0].index(255)  # the image token: the last id
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens >= len(prompt_ids[0]) - 4
    assert other.num_cached_tokens == image_start // 4 * 4
    assert first.outputs[0].token_ids == expected[0]
    assert again.outputs[0].token_ids == expected[0]
    assert other.outputs[0].token_ids == expected[1]
    # A hit that ends inside an image: the rest of its rows come from the encoder again.
    runner = _runner(llm)
    (cold,) = llm.generate(_inputs([prompts[4]]), GREEDY)
    encoded = runner.encoder_cache.encoded
    (warm,) = llm.generate(_inputs([prompts[4]]), GREEDY)
    assert prompt_ids[4].index(255) < warm.num_cached_tokens < len(prompt_ids[4])
    assert runner.encoder_cache.encoded == encoded + 1
    assert cold.outputs[0].token_ids == warm.outputs[0].token_ids == expected[4]


def test_llava_preemption_recomputes_images(llava, tmp_path):
    """A KV pool too small for every request at full length: preempted requests compute
    their prompt again, images included, and still give transformers' tokens."""
    path, prompts, prompt_ids, expected = llava
    layout = preemption_layout([len(p) for p in prompt_ids[:3]], MAX_TOKENS, (4, 2))
    assert layout is not None
    block_size, num_blocks = layout
    llm = _llm(
        path,
        tmp_path,
        block_size=block_size,
        num_gpu_blocks_override=num_blocks,
        enable_prefix_caching=False,
    )
    outs = llm.generate(_inputs(prompts[:3]), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]
    assert llm.engine.stats()["num_preemptions"] > 0


def test_llava_samples_and_speculation(llava, tmp_path):
    """``n = 2`` (the second sample takes the first's KV, image blocks included) and
    n-gram speculative decoding over a prompt with images keep transformers' tokens."""
    path, prompts, _, expected = llava
    llm = _llm(path, tmp_path, block_size=4)
    two = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, n=2)
    (out,) = llm.generate(_inputs([prompts[2]]), two)
    assert [c.token_ids for c in out.outputs] == [expected[2], expected[2]]
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}
    llm = _llm(path, tmp_path, speculative_config=spec, enable_prefix_caching=False)
    outs = llm.generate(_inputs(prompts[:3]), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected[:3]
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
