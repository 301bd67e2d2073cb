"""Several base models behind one real ``tessellm serve``, through the openai SDK: a tiny
Llama and a tiny Qwen3 answer their own requests concurrently with the tokens each gives
alone (an offline ``LLM``, greedy); /v1/models lists them; a model loads on first use;
under ``--max-loaded-models 1`` alternating requests unload and reload models and every
one completes right; an unknown model is a 404, one that cannot load a clear 400 while
the others serve on."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_harness import start_server

from tessellm import LLM, SamplingParams

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

KEY = "multimodel-key"
PROMPTS = ["The capital of France is", "hello world", "one two three"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tessellm.testing import tiny_model

    root = tmp_path_factory.mktemp("multimodel")
    llama = tiny_model("LlamaForCausalLM", root / "llama", seed=1)
    qwen = tiny_model("Qwen3ForCausalLM", root / "qwen", seed=2)
    return {"llama": llama, "qwen": qwen}, root


@pytest.fixture(scope="module")
def expected(models):
    """Each model alone, offline: greedy texts for PROMPTS and for one chat."""
    paths, root = models
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = {}
    for name, path in paths.items():
        llm = LLM(model=str(path), dtype="float32", device="cpu", download_dir=str(root))
        texts[name] = [out.outputs[0].text for out in llm.generate(PROMPTS, params)]
        texts[name + ":chat"] = llm.chat([{"role": "user", "content": "hi"}], params)[0]
        texts[name + ":chat"] = texts[name + ":chat"].outputs[0].text
        del llm
    assert texts["llama"] != texts["qwen"]  # the models are told apart
    return texts


@pytest.fixture(scope="module")
def server(models):
    paths, root = models
    server = start_server(
        paths["llama"], root, "--served-model-name", "llama", "--model", str(paths["qwen"]),
        "--served-model-name", "qwen", "--model", str(root / "no-such-model"),
        "--served-model-name", "broken", "--api-key", KEY,
    )  # fmt: skip
    yield server
    server.stop()


def complete(client, model: str, prompt: str) -> str:
    out = client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert out.model == model
    return out.choices[0].text


def stream_chat(client, model: str) -> str:
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def loaded(server) -> dict[str, float]:
    metrics = server.metrics()
    return {m: metrics[f'tessellm:model_loaded{{model="{m}"}}'] for m in ("llama", "qwen")}


def test_models_are_listed_and_load_on_first_use_then_answer_concurrently(server, expected):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {"llama", "qwen", "broken"}
    assert loaded(server) == {"llama": 1.0, "qwen": 0.0}  # the default loads at start
    jobs = [(m, i) for i in range(len(PROMPTS)) for m in ("llama", "qwen")] * 2
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: complete(client, job[0], PROMPTS[job[1]]), jobs))
        chats = list(pool.map(lambda m: stream_chat(client, m), ["qwen", "llama"] * 2))
    assert texts == [expected[m][i] for m, i in jobs]
    assert chats == [expected["qwen:chat"], expected["llama:chat"]] * 2
    assert loaded(server) == {"llama": 1.0, "qwen": 1.0}
    # The default model answers a request that names none.
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = httpx.post(
        server.base_url + "/completions", json={"prompt": PROMPTS[0]}, headers=auth, timeout=30
    )
    assert raw.status_code == 200 and raw.json()["model"] == "llama"


def test_unknown_model_is_a_404_and_the_api_key_guards_every_model(server):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        complete(client, "gpt-4", "hi")
    assert "'gpt-4' does not exist" in str(err.value) and "'qwen'" in str(err.value)
    keyless = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    for model in ("llama", "qwen"):
        with pytest.raises(openai.AuthenticationError):
            complete(keyless, model, "hi")
    with pytest.raises(openai.AuthenticationError):
        keyless.models.list()


def test_a_model_that_cannot_load_is_a_clear_error_and_the_others_serve(server, expected):
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    for _ in range(2):  # the same answer each time
        with pytest.raises(openai.BadRequestError) as err:
            complete(client, "broken", "hi")
        assert err.value.code == "model_load_failed"
        assert "the model 'broken' could not be loaded" in err.value.message
        assert "no-such-model" in err.value.message
    assert httpx.get(server.url + "/health").status_code == 200
    assert complete(client, "qwen", PROMPTS[1]) == expected["qwen"][1]
    assert complete(client, "llama", PROMPTS[1]) == expected["llama"][1]


def test_one_loaded_model_at_a_time_loses_no_request(models, expected, tmp_path):
    """--max-loaded-models 1 and a config file (with its own engine arguments and a LoRA
    adapter): requests alternate between the models, concurrently; each completes with
    the right tokens, the adapter's too (it survives its model's unloads)."""
    pytest.importorskip("peft")
    from test_lora_parity import make_adapter

    from tessellm.lora import LoRARequest

    paths, root = models
    adapter = make_adapter(paths["qwen"], tmp_path / "adapter", seed=3, rank=4)
    llm = LLM(model=str(paths["qwen"]), dtype="float32", device="cpu", enable_lora=True,
              max_lora_rank=8, download_dir=str(root))  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    lora = LoRARequest("x", 1, adapter)
    with_adapter = [o.outputs[0].text for o in llm.generate(PROMPTS, params, lora_request=lora)]
    del llm
    assert with_adapter != expected["qwen"]
    config = tmp_path / "models.json"
    entry = {"model": str(paths["qwen"]), "served_model_name": "qwen", "max_model_len": 64,
             "max_lora_rank": 8, "lora_modules": [f"qwen-sql={adapter}"]}  # fmt: skip
    config.write_text(json.dumps([entry]))
    server = start_server(
        paths["llama"], tmp_path, "--served-model-name", "llama", "--models-config", str(config),
        "--max-loaded-models", "1",
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        cards = {card.id: card for card in client.models.list().data}
        assert set(cards) == {"llama", "qwen", "qwen-sql"}  # before qwen ever loaded
        assert cards["qwen-sql"].parent == "qwen" and cards["qwen-sql"].root == adapter
        jobs = [("llama", 0), ("qwen", 1), ("llama", 2), ("qwen-sql", 0), ("llama", 1),
                ("qwen", 2), ("qwen-sql", 1)]  # fmt: skip
        with ThreadPoolExecutor(3) as pool:
            texts = list(pool.map(lambda job: complete(client, job[0], PROMPTS[job[1]]), jobs))
            chats = list(pool.map(lambda m: stream_chat(client, m), ["qwen", "llama"] * 2))
        wanted = {**expected, "qwen-sql": with_adapter}
        assert texts == [wanted[m][i] for m, i in jobs]
        assert chats == [expected["qwen:chat"], expected["llama:chat"]] * 2
        metrics = server.metrics()
        assert sum(loaded(server).values()) == 1.0
        unloads = sum(metrics[f'tessellm:model_unloads_total{{model="{m}"}}'] for m in paths)
        assert unloads >= 2  # qwen came in once, and the chats swapped at least once more
        assert complete(client, "qwen-sql", PROMPTS[2]) == with_adapter[2]
        cards = {card.id: card for card in client.models.list().data}
        assert cards["qwen"].max_model_len == 64  # the config's own engine argument
        assert cards["llama"].max_model_len != 64
    finally:
        server.stop()
