"""Mamba2ForCausalLM against transformers' torch path (fp32, tiny random config with
several heads per group and chunks of 8 tokens, so prompts span several chunks): greedy
tokens batched, one at a time, under preemption, with chunked prefill (prompts cut into
chunks mixed with decodes), and for n > 1; the chunked scan against the one-step update."""

from __future__ import annotations

import pytest
import torch

from tessellm import LLM, SamplingParams
from tessellm.testing import assert_greedy_parity, hf_greedy, tiny_model
from tessellm.testing.reference import encode_prompts
from tessellm_mamba.ssm import chunked_scan, step_update

MAMBA2 = dict(
    hidden_size=64,
    expand=2,
    num_heads=8,
    head_dim=16,
    n_groups=2,
    state_size=16,
    conv_kernel=4,
    chunk_size=8,
    num_hidden_layers=2,
)
PROMPTS = [
    "the quick brown fox jumps over the lazy dog and runs far away into the woods",
    "hello",
    "one two three four five six seven eight nine ten",
]


@pytest.fixture(scope="module")
def mamba2(tmp_path_factory):
    return tiny_model("Mamba2ForCausalLM", tmp_path_factory.mktemp("mamba2") / "m", **MAMBA2)


def test_greedy_matches_hf(mamba2):
    assert_greedy_parity(
        mamba2,
        PROMPTS,
        max_tokens=16,
        enforce_eager=True,
        modes=("batched", "one_at_a_time", "preemption"),
    )


def test_chunked_prefill_n_greater_than_one_and_sleep(mamba2):
    prompt_ids = encode_prompts(mamba2, PROMPTS)
    expected = hf_greedy(mamba2, prompt_ids, 12)
    llm = LLM(
        model=str(mamba2),
        dtype="float32",
        enforce_eager=True,
        max_num_batched_tokens=6,  # every long prompt runs in chunks, beside decodes
        max_num_seqs=4,
    )
    try:
        assert not llm.engine.kv_cache_manager.enable_prefix_caching  # recurrent layers
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompt_ids], params)
        for out, want in zip(outs, expected, strict=True):
            assert [list(o.token_ids) for o in out.outputs] == [want, want]
        assert llm.engine.stats()["num_preemptions"] == 0
        # Sleeping frees the states with the KV cache; awake, the model serves as before.
        for level in (1, 2):
            llm.sleep(level)
            llm.wake_up()
            again = llm.generate([{"prompt_token_ids": prompt_ids[0]}], params)[0]
            assert [list(o.token_ids) for o in again.outputs] == [expected[0]] * 2
    finally:
        llm.engine.shutdown()


def test_chunked_scan_equals_step_updates():
    torch.manual_seed(0)
    batch, length, heads, head_dim, d_state = 3, 19, 4, 8, 5
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.rand(batch, length, heads) * 0.5
    lengths = torch.tensor([19, 7, 1])
    dt = dt * (torch.arange(length)[None, :] < lengths[:, None])[..., None]  # padding: dt 0
    a, d = -torch.rand(heads) - 0.1, torch.randn(heads)
    b, c = torch.randn(batch, length, heads, d_state), torch.randn(batch, length, heads, d_state)
    init = torch.randn(batch, heads, head_dim, d_state)
    y, final = chunked_scan(x, dt, a, b, c, d, init, chunk_size=8)
    state = init.clone()
    for t in range(length):
        y_t = step_update(state, x[:, t], dt[:, t], a, b[:, t], c[:, t], d)  # in place
        for row in range(batch):
            if t < lengths[row]:
                torch.testing.assert_close(y[row, t], y_t[row], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, state, rtol=1e-4, atol=1e-4)
