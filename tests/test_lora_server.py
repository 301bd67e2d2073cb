"""LoRA adapters over HTTP with the openai SDK: --lora-modules at start-up, /v1/models
lists them, a request's model picks one (its tokens equal the offline engine's with the
same adapter), /v1/load_lora_adapter and /v1/unload_lora_adapter at run time, and bad
adapters are 400s that leave the server healthy."""

from __future__ import annotations

import httpx
import pytest
from server_harness import start_server
from test_lora_parity import make_adapter

from tessellm import LLM, SamplingParams
from tessellm.lora import LoRARequest

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
pytest.importorskip("peft")

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tessellm.testing import tiny_model

    root = tmp_path_factory.mktemp("lora-server")
    model = tiny_model("LlamaForCausalLM", root / "base")
    first = make_adapter(model, root / "first", seed=1, rank=8)
    second = make_adapter(model, root / "second", seed=2, rank=4, targets=["q_proj", "v_proj"])
    server = start_server(
        model, root, "--lora-modules", f"first={first}", "--max-loras", "2", "--max-lora-rank", "8"
    )
    yield model, first, second, server
    server.stop()


def offline_text(model, adapter: str | None, tmp_path) -> str:
    llm = LLM(model=str(model), dtype="float32", device="cpu", enable_lora=True,
              max_lora_rank=8, download_dir=str(tmp_path))  # fmt: skip
    lora = LoRARequest("x", 1, adapter) if adapter else None
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return llm.generate(PROMPT, params, lora_request=lora)[0].outputs[0].text


def complete(client, model: str) -> str:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def test_adapters_are_listed_and_selected_by_model(setup, tmp_path):
    model, first, _, server = setup
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    cards = {card.id: card for card in client.models.list().data}
    assert set(cards) == {str(model), "first"}
    assert cards["first"].root == first and cards["first"].parent == str(model)
    base_text, first_text = complete(client, str(model)), complete(client, "first")
    assert first_text == offline_text(model, first, tmp_path)
    assert base_text == offline_text(model, None, tmp_path) != first_text


def test_load_and_unload_at_run_time(setup, tmp_path):
    model, _, second, server = setup
    client = openai.OpenAI(base_url=server.base_url, api_key="none")
    loaded = httpx.post(
        server.base_url + "/load_lora_adapter", json={"lora_name": "second", "lora_path": second}
    )
    assert loaded.status_code == 200, loaded.text
    assert complete(client, "second") == offline_text(model, second, tmp_path)
    unloaded = httpx.post(server.base_url + "/unload_lora_adapter", json={"lora_name": "second"})
    assert unloaded.status_code == 200
    with pytest.raises(openai.NotFoundError):
        complete(client, "second")


def test_bad_adapters_are_400s(setup, tmp_path):
    _, first, _, server = setup
    missing = httpx.post(
        server.base_url + "/load_lora_adapter",
        json={"lora_name": "gone", "lora_path": str(tmp_path / "nothing")},
    )
    assert missing.status_code == 400 and "no LoRA adapter at" in missing.json()["error"]["message"]
    taken = httpx.post(
        server.base_url + "/load_lora_adapter", json={"lora_name": "first", "lora_path": first}
    )
    assert taken.status_code == 400 and "already served" in taken.text
    assert httpx.get(server.url + "/health").status_code == 200
