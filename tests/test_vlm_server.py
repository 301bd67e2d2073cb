"""Image input through ``/v1/chat/completions`` with the official ``openai`` client against a
real ``tessellm serve`` of a tiny random LLaVA: a base64 PNG data URL gives transformers'
greedy tokens; an http URL (not allowed by default), a broken data URL, bytes that are
no image, and an image with too many pixels are 400s after which the server still answers."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from server_harness import start_server

from tessellm_llava.testing import hf_llava_greedy, sample_images, tiny_llava

pytestmark = pytest.mark.slow

MAX_TOKENS = 6
QUESTION = "The quick brown fox"


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tiny_llava(tmp_path_factory.mktemp("vlm-server") / "tiny")
    image = sample_images(1, seed=3)[0]
    # The tiny tokenizer's chat template: "role: content " ... "assistant: ", an image
    # part becoming "<image>\n" before the message's text.
    rendered = f"user: <image>\n{QUESTION} assistant: "
    prompt_ids, expected = hf_llava_greedy(path, [(rendered, [image])], MAX_TOKENS)
    return path, image, prompt_ids[0], expected[0]


@pytest.fixture(scope="module")
def server(llava, tmp_path_factory):
    server = start_server(llava[0], tmp_path_factory.mktemp("vlm-server-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0) as c:
        yield c


def _ask(client, image_url: str, **kwargs):
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
        **kwargs,
    )


def test_vlm_server_png_data_url_matches_hf(client, llava):
    path, image, prompt_ids, expected = llava
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    response = _ask(client, png_data_url(image))
    # (The incremental detokenizer's word-level pieces start with a space.)
    text = response.choices[0].message.content
    assert text.strip() == tokenizer.decode(expected, skip_special_tokens=True)
    # The prompt counts every image row, as the processor expanded it.
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == MAX_TOKENS


def test_vlm_server_streams_the_same_answer(client, llava):
    stream = _ask(client, png_data_url(llava[1]), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == _ask(client, png_data_url(llava[1])).choices[0].message.content


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:9/cat.png", "does not fetch image URLs"),
        ("data:image/png;base64,%%%not-base64", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), "decoded"),
        ("ftp://example.com/cat.png", "unsupported image URL scheme"),
    ],
)
def test_vlm_server_bad_images_are_400s(client, llava, url, says):
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, url)
    assert says in str(info.value)
    # The server still answers.
    assert _ask(client, png_data_url(llava[1])).usage.completion_tokens == MAX_TOKENS


def test_vlm_server_too_many_pixels_is_400(client):
    from PIL import Image

    huge = Image.new("RGB", (8000, 6000))  # 48 Mpx, a small PNG of one colour
    with pytest.raises(openai.BadRequestError) as info:
        _ask(client, png_data_url(huge))
    assert "pixels" in str(info.value)
