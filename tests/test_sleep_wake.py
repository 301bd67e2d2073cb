"""Engine sleep and wake (vLLM's names): level 1 and level 2 give the same greedy tokens
after waking, the KV cache is freed meanwhile, the prefix cache forgets what it pointed
to, requests while asleep are refused, and a busy engine does not sleep."""

from __future__ import annotations

import pytest

from tessellm import LLM, SamplingParams
from tessellm.errors import EngineSleepingError, InvalidRequestError

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def token_ids(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS)]


@pytest.mark.parametrize("tp", [1, 2])
def test_same_tokens_after_each_level(tiny_llama, tiny_llama_prompt_ids, tmp_path, tp):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", tensor_parallel_size=tp,
              download_dir=str(tmp_path))  # fmt: skip
    try:
        prompts = [{"prompt_token_ids": p} for p in tiny_llama_prompt_ids]
        before = token_ids(llm, prompts)
        for level in (1, 2):
            assert llm.sleep(level) >= 0
            if tp == 1:
                runner = llm.engine.executor.runner
                assert all(layer.k_cache.numel() == 0 for layer in runner.attn_layers)
                assert (runner.model is None) == (level == 2)
            with pytest.raises(EngineSleepingError, match="asleep"):
                llm.generate(prompts[:1], PARAMS)
            assert llm.wake_up() >= 0
            after = llm.generate(prompts, PARAMS)
            assert [o.outputs[0].token_ids for o in after] == before, level
            # The cached prefixes pointed into the freed cache: the first run after waking
            # computes its prompts again.
            assert all(o.num_cached_tokens == 0 for o in after)
    finally:
        llm.engine.shutdown()


def test_a_busy_engine_does_not_sleep(tiny_llama, tmp_path):
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu", download_dir=str(tmp_path))
    llm.engine.add_request("busy", [5, 6, 7], PARAMS)
    with pytest.raises(InvalidRequestError, match="idle"):
        llm.sleep(1)
    with pytest.raises(InvalidRequestError, match="level must be 1 or 2"):
        llm.sleep(3)


@pytest.mark.slow
def test_sleep_and_wake_over_http(tiny_llama, tmp_path):
    import httpx
    from server_harness import start_server

    server = start_server(tiny_llama, tmp_path)
    try:
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        url = server.base_url + "/completions"
        before = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        slept = httpx.post(server.url + "/sleep", params={"level": 2}, timeout=60)
        assert slept.status_code == 200 and slept.json()["is_sleeping"] is True
        assert httpx.get(server.url + "/is_sleeping").json() == {"is_sleeping": True}
        refused = httpx.post(url, json=body, timeout=60)
        assert refused.status_code == 503 and "asleep" in refused.json()["error"]["message"]
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.post(server.url + "/sleep", params={"level": 5}).status_code == 400
        woke = httpx.post(server.url + "/wake_up", timeout=120)
        assert woke.status_code == 200 and woke.json()["is_sleeping"] is False
        after = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
        assert after == before
    finally:
        server.stop()
