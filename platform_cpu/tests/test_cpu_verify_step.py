"""Speculative verification steps on the CPU's compiled libraries (Q = 1 + k tokens per
sequence): the traced attention of several causal queries equals the eager backend's;
steps are padded to Q tokens inside each sequence's own blocks, or left eager (the
reason logged once); greedy tokens with speculation on the compiled verification
library equal HF's fp32 ones and the eager path's."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm.testing import hf_greedy, tiny_model
from tessellm.testing.conformance.speculative import REPEATING_PROMPTS
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_cpu.traced import traced_decode
from tessellm_cpu import background_build, verify_step
from tessellm_cpu.compiled_decode import CompiledDecodeRunner, compiler_missing
from tessellm_cpu.decode_step import DecodeStep
from tessellm_cpu.verify_step import NotCovered, pad_step, verify_batch_ranges

K = 3  # drafts per step: Q = 4 tokens per sequence
NEW_TOKENS = 24
SPEC = {"method": "ngram", "num_speculative_tokens": K}
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
BUILD_TIMEOUT_S = 900  # two tiny libraries: ~30 s on two idle cores, minutes when busy


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("verify") / "llama")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return hf_greedy(tiny_llama, REPEATING_PROMPTS, NEW_TOKENS)


@pytest.fixture(autouse=True)
def no_build_outlives_its_test():
    yield
    for build in list(background_build._LIVE):
        build.kill()


def metadata_of(counts, seq_lens, tables) -> tuple[AttentionMetadata, torch.Tensor]:
    loc = torch.tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    table = torch.tensor(tables, dtype=torch.int32)
    positions = np.concatenate([np.arange(n - q, n) for q, n in zip(counts, seq_lens, strict=True)])
    return AttentionMetadata(
        query_start_loc=loc,
        seq_lens=lens,
        block_tables=table,
        slot_mapping=torch.zeros(int(loc[-1]), dtype=torch.int64),
        max_query_len=max(counts),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=loc,
        seq_lens_cpu=lens,
    ), torch.from_numpy(positions.astype(np.int64))


@pytest.mark.parametrize(("window", "cap"), [(None, None), (5, None), (7, 20.0)])
def test_traced_attention_of_several_queries_matches_the_planned_backend(window, cap):
    torch.manual_seed(0)
    heads, kv_heads, head_size, block_size, num_blocks, q = 4, 2, 16, 4, 12, 3
    spec = AttentionSpec(
        "cpu", torch.float32, head_size, heads, kv_heads, block_size, bool(window), bool(cap)
    )
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_size)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_size)
    tables = [[5, 0, 0, 0], [2, 7, 1, 0], [11, 3, 8, 4]]
    metadata, _ = metadata_of([q] * 3, [3, 9, 14], tables)
    query = torch.randn(3 * q, heads, head_size)
    expected = CpuPagedAttention(spec).forward(
        query, k_cache, v_cache, metadata, scale=0.25, sliding_window=window, logits_soft_cap=cap
    )
    got = traced_decode(
        query, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, 0.25, window, cap
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_verification_ranges_split_where_the_rows_pass_the_int4_kernels_limit():
    assert verify_batch_ranges([(1, 16), (17, 64)], 4) == [(1, 4), (5, 16), (17, 64)]
    assert verify_batch_ranges([(1, 16)], 5) == [(1, 3), (4, 16)]
    assert verify_batch_ranges([(1, 16)], 16) == [(1, 1), (2, 16)]
    assert verify_batch_ranges([(1, 16)], 17) == [(1, 16)]


def test_a_step_is_padded_to_q_tokens_inside_each_sequences_blocks():
    # Block size 4. Sequence 0: 2 tokens at 5-6, blocks 3, 9 and 5 (reserved: position 8
    # is in it); sequence 1: 4 tokens at 8-11 (blocks 1, 2, 6); sequence 2: 1 token at 0.
    metadata, positions = metadata_of([2, 4, 1], [7, 12, 1], [[3, 9, 5], [1, 2, 6], [4, 0, 0]])
    ids = torch.tensor([10, 11, 20, 21, 22, 23, 30])
    padded = pad_step(ids, positions, metadata, 4, block_size=4, max_model_len=64)
    assert padded.input_ids.tolist() == [10, 11, 11, 11, 20, 21, 22, 23, 30, 30, 30, 30]
    assert padded.positions.tolist() == [5, 6, 7, 8, 8, 9, 10, 11, 0, 1, 2, 3]
    assert padded.slot_mapping.tolist() == [37, 38, 39, 20, 24, 25, 26, 27, 16, 17, 18, 19]
    assert padded.seq_lens.tolist() == [9, 12, 4]
    assert padded.real_rows.tolist() == [0, 1, 4, 5, 6, 7, 8]


def test_a_step_padded_past_a_sequences_blocks_is_not_covered():
    # Sequence 0's last token ends its only block: Q = 3 would write into a block it
    # does not have (the table's 0 is padding, or block 0 of another sequence).
    metadata, positions = metadata_of([1, 2], [4, 6], [[3, 0], [1, 2]])
    ids = torch.tensor([1, 2, 3])
    with pytest.raises(NotCovered, match="do not reach"):
        pad_step(ids, positions, metadata, 3, block_size=4, max_model_len=64)
    with pytest.raises(NotCovered, match="max_model_len"):
        pad_step(ids, positions, metadata, 3, block_size=4, max_model_len=6)
    # LongRoPE picks its frequencies by seq_lens: padding must not cross its limit.
    metadata, positions = metadata_of([1, 2], [2, 6], [[3, 0], [1, 2]])
    with pytest.raises(NotCovered, match="past 6 tokens"):
        pad_step(ids, positions, metadata, 3, 4, max_model_len=64, length_limits=(6,))
    with pytest.raises(NotCovered, match="more than 1") as raised:
        pad_step(ids, positions, metadata, 1, block_size=4, max_model_len=64)
    assert not raised.value.verification  # a prompt chunk: not logged as verification
    covered = pad_step(ids, positions, metadata, 3, 4, max_model_len=64, length_limits=(5, 9))
    assert covered.slot_mapping.tolist() == [13, 14, 15, 8, 9, 10]
    assert covered.real_rows.tolist() == [0, 3, 4]


class EagerTracedLibrary:
    """Stands in for a built verification library: the step module it is exported from,
    run eagerly with the attention on its traced path (what the library computes)."""

    def __init__(self, runner: CompiledDecodeRunner) -> None:
        self.runner = runner
        self.step = DecodeStep(runner.model, runner.attn_layers, runner.verify.query_len)
        self.shapes: list[tuple[int, int]] = []

    def boxed_run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        ids, positions, slots, tables, seq_lens = inputs[:5]
        self.shapes.append((ids.shape[0], seq_lens.shape[0]))
        mp = pytest.MonkeyPatch()
        mp.setattr(torch.compiler, "is_compiling", lambda: True)
        try:
            kv = self.runner._kv_caches()
            return [self.step(ids, positions, slots, tables, seq_lens, kv, self.runner.weights)]
        finally:
            mp.undo()


def test_padded_verification_steps_give_hfs_greedy_tokens(
    tiny_llama, reference, caplog, monkeypatch
):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "0")  # no build: the stand-in library runs
    padded_steps = []

    def recording_pad_step(*args, **kwargs):
        padded_steps.append(pad_step(*args, **kwargs))
        return padded_steps[-1]

    monkeypatch.setattr(verify_step, "pad_step", recording_pad_step)
    llm = LLM(model=str(tiny_llama), dtype="float32", speculative_config=SPEC, max_num_seqs=4)
    runner = llm.engine.executor.runner.graph_runner
    assert isinstance(runner, CompiledDecodeRunner) and runner.verify.query_len == K + 1
    library = EagerTracedLibrary(runner)
    runner.verify.add(1, 16, library)
    with caplog.at_level(logging.INFO, logger="tessellm_cpu.compiled_decode"):
        outs = llm.generate([{"prompt_token_ids": p} for p in REPEATING_PROMPTS], GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == reference
        for prompt, expected in zip(REPEATING_PROMPTS, reference, strict=True):
            out = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
            assert out.outputs[0].token_ids == expected
    assert runner.verify_steps > 0 and runner.steps == 0
    assert all(rows == (K + 1) * seqs for rows, seqs in library.shapes)
    assert any(seqs > 1 for _, seqs in library.shapes)  # batched verification steps
    assert any(step.real_rows is not None for step in padded_steps)  # fewer than k drafts
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    eager = [r.message for r in caplog.records if "verification steps run eagerly" in r.message]
    assert len(eager) == len(set(eager))  # each reason once


needs_compiler = pytest.mark.skipif(
    compiler_missing() is not None, reason="no C++ compiler to build libraries"
)


@needs_compiler
def test_compiled_verification_library_gives_hfs_and_eager_greedy_tokens(
    tiny_llama, reference, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", "wait")
    monkeypatch.setenv("TESSELLM_CACHE", str(tmp_path))
    monkeypatch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")  # the traced sizes and dtypes
    # max_num_seqs 4: one decode library (1-16 sequences), one verification (1-4).
    llm = LLM(model=str(tiny_llama), dtype="float32", speculative_config=SPEC, max_num_seqs=4)
    runner = llm.engine.executor.runner.graph_runner
    assert isinstance(runner, CompiledDecodeRunner)
    assert runner.wait_ready(BUILD_TIMEOUT_S), runner.failure
    assert runner.ready_ranges == [(1, 16), (1, 4, K + 1)]
    outs = llm.generate([{"prompt_token_ids": p} for p in REPEATING_PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    for prompt, expected in zip(REPEATING_PROMPTS, reference, strict=True):
        out = llm.generate([{"prompt_token_ids": prompt}], GREEDY)[0]
        assert out.outputs[0].token_ids == expected
    assert runner.verify_steps > 0 and runner.steps > 0
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    llm.engine.shutdown()

    # The switch: verification eager, the decode library loaded from the cache.
    monkeypatch.setenv("TESSELLM_CPU_COMPILE_VERIFY", "0")
    with caplog.at_level(logging.INFO, logger="tessellm_cpu.compiled_decode"):
        eager = LLM(model=str(tiny_llama), dtype="float32", speculative_config=SPEC, max_num_seqs=4)
    runner = eager.engine.executor.runner.graph_runner
    assert runner.ready_ranges == [(1, 16)] and runner.pending == []
    assert "verification steps run eagerly: TESSELLM_CPU_COMPILE_VERIFY=0" in caplog.text
    outs = eager.generate([{"prompt_token_ids": p} for p in REPEATING_PROMPTS], GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert runner.verify_steps == 0 and runner.steps > 0
