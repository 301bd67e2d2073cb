"""Image input's edges, offline: decoding limits, URL fetching only for allowed hosts,
placeholder/image mismatches and text-only models as clear errors, and ``LLM.chat`` with
OpenAI-style image parts giving the same tokens as ``generate`` with the same image."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import pytest

from tessellm import LLM, SamplingParams
from tessellm.errors import InvalidRequestError
from tessellm.multimodal.images import ImageLimits, decode_data_url, load_image_url
from tessellm_llava.testing import sample_images, tiny_llava

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tiny_llava(tmp_path_factory.mktemp("vlm-inputs") / "tiny")
    return LLM(model=str(path), dtype="float32", enforce_eager=True, download_dir=str(path))


def test_vlm_decode_limits():
    image = sample_images(1)[0]
    assert decode_data_url(data_url(image), ImageLimits()).size == image.size
    with pytest.raises(InvalidRequestError, match="bytes"):
        decode_data_url(data_url(image), ImageLimits(max_image_bytes=100))
    with pytest.raises(InvalidRequestError, match="pixels"):
        decode_data_url(data_url(image), ImageLimits(max_image_pixels=40 * 31))
    with pytest.raises(InvalidRequestError, match="base64"):
        decode_data_url("data:image/png;base64,@@@", ImageLimits())
    with pytest.raises(InvalidRequestError, match="data:<type>;base64"):
        decode_data_url("data:image/png,rawbytes", ImageLimits())


def test_vlm_urls_fetched_only_from_allowed_hosts(monkeypatch):
    payload = png_bytes(sample_images(1)[0])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
    try:
        monkeypatch.delenv("TESSELLM_ALLOWED_MEDIA_DOMAINS", raising=False)
        with pytest.raises(InvalidRequestError, match="does not fetch image URLs"):
            load_image_url(url, ImageLimits())
        monkeypatch.setenv("TESSELLM_ALLOWED_MEDIA_DOMAINS", "example.com, 127.0.0.1")
        assert load_image_url(url, ImageLimits()).size == (40, 32)
        with pytest.raises(InvalidRequestError, match="bytes"):
            load_image_url(url, ImageLimits(max_image_bytes=50))
    finally:
        server.shutdown()
        server.server_close()


def test_vlm_mismatches_are_clear_errors(llm):
    images = sample_images(2)
    one = "Hello <image> A"
    with pytest.raises(InvalidRequestError, match=r"1 image placeholder.*2 image"):
        llm.generate({"prompt": one, "multi_modal_data": {"image": images}}, GREEDY)
    with pytest.raises(InvalidRequestError, match="no image was given"):
        llm.generate(one, GREEDY)
    with pytest.raises(InvalidRequestError, match="PIL"):
        llm.generate({"prompt": one, "multi_modal_data": {"image": b"png"}}, GREEDY)
    with pytest.raises(InvalidRequestError, match=r"key\(s\) video"):
        llm.generate({"prompt": one, "multi_modal_data": {"video": images}}, GREEDY)
    with pytest.raises(InvalidRequestError, match=r"17 image placeholder.*1 image"):
        ids = llm.get_tokenizer().encode("Hello " + "<image>" * 17 + " A")
        llm.generate({"prompt_token_ids": ids, "multi_modal_data": {"image": images[0]}}, GREEDY)
    # An already expanded prompt (one image's 16 rows) is taken as it is.
    ids = llm.get_tokenizer().encode("Hello " + "<image>" * 16 + " A")
    (expanded,) = llm.generate(
        {"prompt_token_ids": ids, "multi_modal_data": {"image": images[0]}}, GREEDY
    )
    assert expanded.prompt_token_ids == ids
    # Nothing was left running: the engine still answers.
    (out,) = llm.generate({"prompt": one, "multi_modal_data": {"image": images[0]}}, GREEDY)
    assert len(out.outputs[0].token_ids) == 4


def test_vlm_text_model_refuses_images(tiny_model_factory, tmp_path):
    path = tiny_model_factory("LlamaForCausalLM")
    text_llm = LLM(model=str(path), dtype="float32", enforce_eager=True, download_dir=str(tmp_path))
    image = sample_images(1)[0]
    with pytest.raises(InvalidRequestError, match="does not take images"):
        text_llm.generate({"prompt": "A", "multi_modal_data": {"image": image}}, GREEDY)
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}}]
    with pytest.raises(InvalidRequestError, match="does not take images"):
        text_llm.chat([{"role": "user", "content": parts}], GREEDY)


def test_vlm_chat_parts_match_generate(llm):
    """A data-URL part and a PIL part in one message: placeholders before the text, as the
    server renders them; the same tokens as ``generate`` on that prompt."""
    first, second = sample_images(2, seed=5)
    message = {
        "role": "user",
        "content": [
            {"type": "text", "text": "The quick brown fox"},
            {"type": "image_url", "image_url": {"url": data_url(first)}},
            {"type": "image_pil", "image_pil": second},
        ],
    }
    (chat,) = llm.chat([message], GREEDY)
    prompt = "user: <image>\n<image>\nThe quick brown fox assistant: "
    decoded = decode_data_url(data_url(first), ImageLimits())
    direct_input = {"prompt": prompt, "multi_modal_data": {"image": [decoded, second]}}
    (direct,) = llm.generate(direct_input, GREEDY)
    assert chat.prompt_token_ids == direct.prompt_token_ids
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    with pytest.raises(InvalidRequestError, match="unsupported message content part"):
        llm.chat([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], GREEDY)
