"""The draft-model proposer: a self-draft's guesses are the target's own greedy tokens, so
every draft is accepted (batched, across block boundaries and scratch blocks, after
prefix-cache hits and under preemption); its cache follows a request's blocks; a draft of
another vocabulary is refused; drafts stay below the target's vocabulary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError
from tessellm.interfaces.request import Request
from tessellm.testing import hf_greedy

os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")  # eager decode: no C++ build per model

PROMPTS = [
    [5, 17, 33, 8, 41] * 3,
    list(range(40, 63)),
    [90, 91, 92, 93] * 2 + [7],
]


def make_llm(target: Path, draft: Path | None, k: int = 3, **engine_args) -> LLM:
    spec = None if draft is None else {"method": "draft_model", "model": str(draft)}
    if spec is not None:
        spec["num_speculative_tokens"] = k
    return LLM(
        model=str(target),
        dtype="float32",
        device="cpu",
        download_dir=str(target.parent / "cache"),
        speculative_config=spec,
        **engine_args,
    )


def generate(llm: LLM, prompts: list[list[int]], max_tokens: int = 20) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_a_self_draft_is_always_accepted(tiny_model_factory, architecture):
    target = tiny_model_factory(architecture)
    expected = hf_greedy(target, PROMPTS + PROMPTS[:1], 20)
    # Blocks of 4 with k = 5: a round's tail crosses blocks and runs into scratch blocks.
    llm = make_llm(target, target, k=5, block_size=4)
    try:
        assert generate(llm, PROMPTS) == expected[:3]
        stats = llm.engine.stats()
        assert stats["spec_decode_num_draft_tokens"] > 0
        assert stats["spec_decode_acceptance_rate"] == 1.0
        assert stats["spec_decode_mean_accepted_length"] > 4
        assert stats["spec_decode_proposer_ms_per_step"] > 0
        # Again, and a prompt sharing the first one's blocks: prefix-cache hits.
        assert generate(llm, [PROMPTS[0], PROMPTS[0]]) == [expected[0], expected[3]]
        stats = llm.engine.stats()
        assert stats["prefix_cache_hit_tokens"] > 0
        assert stats["spec_decode_acceptance_rate"] == 1.0
        assert stats["kv_cache_usage"] == 0.0
        assert llm.engine.speculator.proposer._states == {}  # finished requests forgotten
    finally:
        llm.engine.shutdown()


def test_a_self_draft_is_always_accepted_under_preemption(tiny_model_factory):
    target = tiny_model_factory("LlamaForCausalLM")
    expected = hf_greedy(target, PROMPTS, 24)
    # 3 prompts of 9-23 tokens + 24 outputs need 17 blocks of 4 at their peaks.
    llm = make_llm(target, target, block_size=4, num_gpu_blocks_override=14)
    try:
        assert generate(llm, PROMPTS, max_tokens=24) == expected
        stats = llm.engine.stats()
        assert stats["num_preemptions"] > 0
        assert stats["spec_decode_acceptance_rate"] == 1.0
    finally:
        llm.engine.shutdown()


def test_another_draft_keeps_the_outputs_and_is_sometimes_rejected(tiny_model_factory):
    target = tiny_model_factory("LlamaForCausalLM")
    draft = tiny_model_factory("LlamaForCausalLM", seed=3, num_hidden_layers=1)
    expected = hf_greedy(target, PROMPTS, 20)
    llm = make_llm(target, draft, k=4)
    try:
        assert generate(llm, PROMPTS) == expected
        stats = llm.engine.stats()
        assert stats["spec_decode_num_draft_tokens"] > 0
        assert stats["spec_decode_acceptance_rate"] < 1.0
    finally:
        llm.engine.shutdown()


def test_the_cache_follows_the_requests_blocks(tiny_model_factory):
    """Called directly: the drafts are the target's greedy tokens whatever the draft's
    cache held before, as a request grows, moves to other blocks, or is forgotten."""
    target = tiny_model_factory("LlamaForCausalLM")
    prompt = PROMPTS[1]  # 23 tokens
    greedy = hf_greedy(target, [prompt], 12)[0]
    llm = make_llm(target, target, block_size=4, num_gpu_blocks_override=40)
    try:
        proposer = llm.engine.speculator.proposer
        forward_tokens = record_forwards(proposer)
        request = Request("r", list(prompt), SamplingParams(temperature=0.0))
        # The target has computed all but the last token: 23 positions, 6 blocks of 4.
        request.block_ids = [10, 11, 12, 13, 14, 15]
        assert proposer.propose([request], [3]) == [greedy[:3]]
        assert forward_tokens == [23, 1, 1]  # the catch-up, then one per draft
        assert proposer._states["r"].computed == 23
        # The first draft's KV went to position 23, in the request's last block.
        assert proposer._states["r"].drafts_in_blocks == (greedy[0],)
        # One draft accepted and one more token: the accepted draft's KV stands, and the
        # last token (position 24) is past the request's blocks, in a scratch block, and
        # not counted as computed.
        forward_tokens.clear()
        request.output_token_ids += greedy[:2]
        assert proposer.propose([request], [3]) == [greedy[2:5]]
        assert forward_tokens == [1, 1, 1]
        assert proposer._states["r"].computed == 24
        request.output_token_ids += greedy[2:4]
        request.block_ids += [16]  # now the draft writes position 24 into the real block
        assert proposer.propose([request], [3]) == [greedy[4:7]]
        assert proposer._states["r"].computed == 27
        # Preempted and readmitted elsewhere: the draft starts over in the new blocks.
        request.block_ids = list(range(20, 27))
        assert proposer.propose([request], [2]) == [greedy[4:6]]
        assert proposer._states["r"].block_ids == tuple(range(20, 27))
        # None asked: none made.
        assert proposer.propose([request], [0]) == [[]]
        proposer.finished(["r"])
        assert proposer._states == {}
    finally:
        llm.engine.shutdown()


def test_a_rejected_drafts_kv_is_recomputed(tiny_model_factory):
    """A draft's KV written into the request's block is reused only where the token there
    is the draft: after a rejection followed by another token (two steps between rounds,
    as when the next step was scheduled ahead), the drafts follow the target's tokens."""
    target = tiny_model_factory("LlamaForCausalLM")
    prompt = [7, 100, 31]  # short: one position's KV weighs on every draft
    (greedy,) = hf_greedy(target, [prompt], 3)
    other = (greedy[0] + 1) % 256
    (after_other,) = hf_greedy(target, [[*prompt, other]], 4)
    llm = make_llm(target, target, block_size=4, num_gpu_blocks_override=40)
    try:
        proposer = llm.engine.speculator.proposer
        request = Request("r", list(prompt), SamplingParams(temperature=0.0))
        request.block_ids = [10, 11]  # 8 positions: the drafts' KV goes to its blocks
        assert proposer.propose([request], [3]) == [greedy]
        assert proposer._states["r"].drafts_in_blocks == tuple(greedy[:2])
        request.output_token_ids += [other, after_other[0]]  # the first draft rejected
        assert proposer.propose([request], [3]) == [after_other[1:]]
    finally:
        llm.engine.shutdown()


def test_prefix_cache_hits_reuse_the_drafts_kv(tiny_model_factory):
    """A prompt the target finds in its prefix cache is also in the draft's cache (same
    block ids, same content): the draft reads only the tokens after the hit blocks."""
    target = tiny_model_factory("LlamaForCausalLM")
    expected = hf_greedy(target, PROMPTS[:1], 20)
    llm = make_llm(target, target, block_size=4)
    try:
        assert generate(llm, PROMPTS[:1]) == expected
        forward_tokens = record_forwards(llm.engine.speculator.proposer)
        assert generate(llm, PROMPTS[:1]) == expected
        # 15 prompt tokens: 3 blocks of 4 are hits; the first catch-up reads the other 3
        # and the first output token.
        assert forward_tokens[0] == 4
        stats = llm.engine.stats()
        assert stats["prefix_cache_hit_tokens"] == 12
        assert stats["spec_decode_acceptance_rate"] == 1.0
    finally:
        llm.engine.shutdown()


def test_a_block_rewritten_for_another_request_is_not_reused(tiny_model_factory):
    """The draft's KV in a block counts for a prefix hit only while the block still holds
    the draft's KV of that content: not once the draft wrote another request's tokens or
    drafts into it, even where the block's recorded content would match."""
    target = tiny_model_factory("LlamaForCausalLM")
    prompt = [7, 100, 31, 9, 60, 61, 62, 5, 8]  # 9 tokens: blocks 0-1 full
    (greedy,) = hf_greedy(target, [prompt], 3)
    llm = make_llm(target, target, block_size=4, num_gpu_blocks_override=40)
    try:
        proposer = llm.engine.speculator.proposer
        first = Request("a", list(prompt), SamplingParams(temperature=0.0))
        first.block_ids, first.block_hashes = [1, 2, 3], [b"h1", b"h2"]
        assert proposer.propose([first], [3]) == [greedy]
        assert proposer._block_contents == {1: b"h1", 2: b"h2"}
        proposer.finished(["a"])
        # Another request with block 1 as its second block: its last known tokens and
        # drafts overwrite it, and it is not full of known tokens.
        other = Request("b", [3, 4, 5, 6, 40, 41], SamplingParams(temperature=0.0))
        other.block_ids, other.block_hashes = [4, 1], [b"g1"]
        proposer.propose([other], [3])
        assert proposer._block_contents == {2: b"h2", 4: b"g1"}
        proposer.finished(["b"])
        again = Request("c", list(prompt), SamplingParams(temperature=0.0))
        again.block_ids, again.block_hashes = [1, 2, 3], [b"h1", b"h2"]
        forward_tokens = record_forwards(proposer)
        assert proposer.propose([again], [3]) == [greedy]
        assert forward_tokens[0] == len(prompt)  # nothing reused
    finally:
        llm.engine.shutdown()


def record_forwards(proposer) -> list[int]:
    """The number of tokens of every draft forward the proposer runs from now on."""
    seen: list[int] = []
    greedy = proposer.draft.greedy

    def recorded(seqs):
        seen.append(sum(len(s.token_ids) for s in seqs))
        return greedy(seqs)

    proposer.draft.greedy = recorded
    return seen


def test_a_draft_of_another_vocabulary_is_refused(tiny_model_factory):
    target = tiny_model_factory("LlamaForCausalLM")
    draft = tiny_model_factory("LlamaForCausalLM", vocab_size=300)
    with pytest.raises(ConfigError, match="another vocabulary"):
        make_llm(target, draft)


def test_a_draft_model_is_required(tiny_model_factory):
    target = tiny_model_factory("LlamaForCausalLM")
    with pytest.raises(ConfigError, match='needs a "model"'):
        LLM(
            model=str(target),
            dtype="float32",
            device="cpu",
            download_dir=str(target.parent / "cache"),
            speculative_config={"method": "draft_model"},
        )


def test_drafts_stay_below_the_targets_vocabulary(tiny_model_factory):
    """A draft with padded logits (wider than the target's, same tokenizer) never proposes
    an id the target does not have, even where its argmax is one."""
    target = tiny_model_factory("LlamaForCausalLM")
    draft = tiny_model_factory("LlamaForCausalLM", vocab_size=320)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (target / name).exists():
            shutil.copy(target / name, draft / name)
    llm = make_llm(target, draft)
    try:
        proposer = llm.engine.speculator.proposer
        assert proposer.draft.proposable == 256
        model = proposer.draft.runner.model
        plain = model.compute_logits

        def padded_wins(hidden):
            logits = plain(hidden)
            logits[:, 256:] = 1e4  # the padding would win every argmax
            return logits

        model.compute_logits = padded_wins
        request = Request("r", list(PROMPTS[0]), SamplingParams(temperature=0.0))
        request.block_ids = [0, 1, 2, 3]
        (drafts,) = proposer.propose([request], [3])
        assert len(drafts) == 3 and max(drafts) < 256
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize("quantization", ["woq_int4", "int8_weight_only"])
def test_a_quantized_self_draft(tiny_model_factory, quantization):
    """The target in fp32 drafting with its own weights quantized on load (CPU methods):
    the draft's linears hold the quantized weights, the target's do not; outputs are the
    target's."""
    target = tiny_model_factory("LlamaForCausalLM")
    expected = hf_greedy(target, PROMPTS, 20)
    spec = {"method": "draft_model", "model": str(target), "quantization": quantization}
    llm = LLM(
        model=str(target),
        dtype="float32",
        device="cpu",
        download_dir=str(target.parent / "cache"),
        speculative_config=spec,
    )
    try:
        proposer = llm.engine.speculator.proposer
        assert proposer.describe()["draft_quantization"] == quantization
        draft_model = proposer.draft.runner.model
        target_model = llm.engine.executor.runner.model
        assert quantized_linears(draft_model) > 0
        assert quantized_linears(target_model) == 0
        assert generate(llm, PROMPTS) == expected
        stats = llm.engine.stats()
        assert stats["spec_decode_num_accepted_tokens"] > 0
    finally:
        llm.engine.shutdown()


def quantized_linears(model) -> int:
    """Linears with an int4 copy (woq) or int8 weights."""
    import torch

    return sum(
        getattr(m, "woq_packed", None) is not None
        or getattr(getattr(m, "weight", None), "dtype", None) == torch.int8
        for m in model.modules()
    )
