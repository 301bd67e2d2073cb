"""``/v1/embeddings`` through the official ``openai`` client against a real ``tessellm serve``
on a tiny random BERT (a sentence-transformers checkpoint: mean pooling, normalised,
Matryoshka sizes 16/32/64), behind an API key; and a generative server's answer."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from server_harness import start_server

from tessellm.testing.embedding import (
    EMBEDDING_SENTENCES,
    MIN_COSINE,
    sentence_transformers_embeddings,
    tiny_embedding_model,
)

pytestmark = pytest.mark.slow

API_KEY = "pool-test-key"
MAX_SEQ = 96


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_embedding_model(
        "BertModel",
        tmp_path_factory.mktemp("pool-server-bert"),
        max_seq_length=MAX_SEQ,
        matryoshka_dimensions=[16, 32, 64],
    )


@pytest.fixture(scope="module")
def reference(bert_dir):
    vectors, ids = sentence_transformers_embeddings(bert_dir, EMBEDDING_SENTENCES)
    return vectors, ids


@pytest.fixture(scope="module")
def server(bert_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("pool-server-logs")
    server = start_server(bert_dir, logs, "--api-key", API_KEY, "--served-model-name", "tiny-bert")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0) as c:
        yield c


def cosine(a, b) -> torch.Tensor:
    a, b = (torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in (a, b))
    return F.cosine_similarity(a, b, dim=-1)


def test_sdk_embeddings_equal_sentence_transformers(client, reference):
    expected, _ = reference
    # The SDK asks for base64 unless told otherwise, and decodes it.
    out = client.embeddings.create(model="tiny-bert", input=EMBEDDING_SENTENCES)
    assert [d.index for d in out.data] == list(range(len(EMBEDDING_SENTENCES)))
    got = [d.embedding for d in out.data]
    assert (cosine(got, expected) >= MIN_COSINE).all()
    floats = client.embeddings.create(
        model="tiny-bert", input=EMBEDDING_SENTENCES[0], encoding_format="float"
    )
    assert len(floats.data) == 1
    assert cosine([floats.data[0].embedding], expected[:1]).item() >= MIN_COSINE
    assert out.model == "tiny-bert"


def test_token_id_inputs_and_usage(client, reference):
    expected, ids = reference
    one = client.embeddings.create(model="tiny-bert", input=ids[2], encoding_format="float")
    assert cosine([one.data[0].embedding], expected[2:3]).item() >= MIN_COSINE
    assert one.usage.prompt_tokens == one.usage.total_tokens == len(ids[2])
    many = client.embeddings.create(model="tiny-bert", input=ids[:4], encoding_format="float")
    assert (cosine([d.embedding for d in many.data], expected[:4]) >= MIN_COSINE).all()
    assert many.usage.prompt_tokens == sum(len(i) for i in ids[:4])


def test_base64_is_little_endian_float32(server, reference):
    expected, _ = reference
    response = httpx.post(
        server.base_url + "/embeddings",
        json={"input": EMBEDDING_SENTENCES[1], "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (expected.shape[1],)
    assert cosine([vector.copy()], expected[1:2]).item() >= MIN_COSINE


def test_matryoshka_dimensions(client, reference):
    expected, _ = reference
    out = client.embeddings.create(
        model="tiny-bert", input=EMBEDDING_SENTENCES[:3], dimensions=32, encoding_format="float"
    )
    got = torch.tensor([d.embedding for d in out.data])
    assert got.shape == (3, 32)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    # The cut is taken before normalising: the first 32 values, renormalised.
    assert (cosine(got, expected[:3, :32]) >= MIN_COSINE).all()
    with pytest.raises(openai.BadRequestError, match="dimensions must be one of"):
        client.embeddings.create(model="tiny-bert", input="A", dimensions=20)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": [1, -3]}, "input"),
        ({"input": [10**6]}, "token ids must be integers in"),
        ({"input": " ".join(["A"] * (MAX_SEQ + 10))}, "maximum context length is 96"),
        ({"input": "A", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "A", "dimensions": 0}, "dimensions"),
        ({"input": "A", "model": "other"}, "does not exist"),
    ],
)
def test_bad_input_is_a_400_and_the_server_stays_healthy(server, client, body, message):
    response = httpx.post(
        server.base_url + "/embeddings",
        json=body,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=30,
    )
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert message in error["message"] or message == error["param"], error
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert len(client.embeddings.create(model="tiny-bert", input="A").data[0].embedding) == 64


def test_api_key_and_generation_routes(server):
    no_key = httpx.post(server.base_url + "/embeddings", json={"input": "A"}, timeout=30)
    assert no_key.status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    for route in ("/completions", "/chat/completions"):
        response = httpx.post(
            server.base_url + route, json={"prompt": "A", "messages": []}, headers=headers
        )
        assert response.status_code == 400
        assert "/v1/embeddings" in response.json()["error"]["message"]
    models = httpx.get(server.base_url + "/models", headers=headers).json()
    assert [m["id"] for m in models["data"]] == ["tiny-bert"]


def test_a_generative_server_refuses_embeddings(tiny_server):
    response = httpx.post(tiny_server.base_url + "/embeddings", json={"input": "A"}, timeout=30)
    assert response.status_code == 400
    assert "generative model" in response.json()["error"]["message"]


def test_concurrent_clients_share_forwards(server, reference):
    import asyncio

    expected, _ = reference

    async def run() -> list[list[float]]:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key=API_KEY, max_retries=0
        ) as client:
            calls = [
                client.embeddings.create(model="tiny-bert", input=s, encoding_format="float")
                for s in EMBEDDING_SENTENCES * 3
            ]
            return [r.data[0].embedding for r in await asyncio.gather(*calls)]

    before = server.metrics()["tessellm:engine_steps_total"]
    got = asyncio.run(run())
    assert (cosine(got, torch.cat([expected] * 3)) >= MIN_COSINE).all()
    steps = server.metrics()["tessellm:engine_steps_total"] - before
    # 30 single-input requests arrived together: they were embedded in fewer forwards.
    assert steps < len(got)
    assert server.metrics()["tessellm:batched_seqs_max"] > 1
