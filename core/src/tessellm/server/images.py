"""Image parts of chat messages (``{"type": "image_url", "image_url": {"url": ...}}``).

Each message's image parts become placeholder text (the model's image token and a
newline per image, before the message's text, as ``tessellm.multimodal.chat`` does
offline) and the images are decoded off the event loop, within the size limits
(``tessellm.multimodal.images``: data URLs; http(s) only for hosts named in
``TESSELLM_ALLOWED_MEDIA_DOMAINS``). Every problem is a 400 naming it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tessellm.engine.llm_engine import LLMEngine
from tessellm.multimodal.chat import resolve_images
from tessellm.multimodal.processor import ProcessedImages
from tessellm.server.context import ServerContext
from tessellm.server.errors import bad_request
from tessellm.server.protocol import ChatCompletionRequest, ImagePart, TextPart


async def take_images(ctx: ServerContext, body: ChatCompletionRequest) -> dict[str, Any] | None:
    """The request's ``multi_modal_data`` (None without images); image parts in
    ``body.messages`` are replaced by their placeholders."""
    urls: list[str] = []
    processor = None
    for message in body.messages:
        parts = message.content
        if not isinstance(parts, list) or not any(isinstance(p, ImagePart) for p in parts):
            continue
        engine = ctx.engine.engine
        if not isinstance(engine, LLMEngine):  # the data-parallel front's view
            raise bad_request(
                "image input is not served with data parallelism yet", param="messages"
            )
        processor = engine.multimodal
        if processor is None:
            raise bad_request("this model does not take images", param="messages")
        images = [p for p in parts if isinstance(p, ImagePart)]
        heads = [TextPart(type="text", text=processor.placeholder_text + "\n") for _ in images]
        message.content = [*heads, *(p for p in parts if isinstance(p, TextPart))]
        urls.extend(p.image_url.url for p in images)
    if processor is None:
        return None
    limit = processor.limits.max_images_per_prompt
    if len(urls) > limit:
        raise bad_request(
            f"{len(urls)} images in one request, more than the limit of {limit}",
            param="messages",
        )
    # Decoding (and fetching an allowed URL) blocks: not on the event loop.
    images = await asyncio.to_thread(resolve_images, urls, processor.limits)
    return {"image": images}


async def process_images(
    ctx: ServerContext, token_ids: list[int], data: dict[str, Any] | None
) -> tuple[list[int], ProcessedImages | None]:
    """The prompt with its image placeholders expanded, and the processed images, from
    the image processor run off the event loop and the engine thread (so the token budget
    counts every image row)."""
    if data is None:
        return token_ids, None
    processor = ctx.engine.engine.multimodal
    expanded, images = await asyncio.to_thread(processor.process, token_ids, data)
    return expanded, ProcessedImages(expanded, images)
