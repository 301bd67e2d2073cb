"""OpenAI-style chat content parts with images, as chat templates read them.

A message's content may be a list of parts: ``{"type": "text", "text": ...}``,
``{"type": "image_url", "image_url": {"url": ...}}`` (a data URL; an http(s) URL only for
an allowed host), and, offline, ``{"type": "image_pil", "image_pil": PIL.Image}`` (vLLM's
name). As vLLM does for templates that take string content, each message becomes one
string: a placeholder (the model's image token, e.g. ``<image>``) and a newline per
image, then its texts; the images are collected in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tessellm.errors import InvalidRequestError
from tessellm.multimodal.images import ImageLimits, check_image, load_image_url


def image_ref(part: dict[str, Any]) -> Any:
    """What an image part holds: a URL string or a PIL image."""
    kind = part.get("type")
    if kind == "image_pil":
        return part.get("image_pil")
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise InvalidRequestError("an image_url part needs image_url.url (a string)")
    return url


def _beyond_text(message: Any) -> bool:
    """Whether the message has a content part other than text (an image, or one that is
    refused)."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        not isinstance(p, dict) or p.get("type") != "text" for p in content
    )


def split_messages(
    messages: list[dict[str, Any]], placeholder: str | None
) -> tuple[list[dict[str, Any]], list[Any]]:
    """Messages with string content, and the image references (URLs or PIL images) in
    order. ``placeholder`` None (a model without images) refuses image parts. Without
    parts other than text the messages are returned as they are (text parts reach the
    template)."""
    if not any(_beyond_text(m) for m in messages):
        return messages, []
    out: list[dict[str, Any]] = []
    refs: list[Any] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        texts: list[str] = []
        heads: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(str(part.get("text", "")))
            elif kind in ("image_url", "image_pil"):
                if placeholder is None:
                    raise InvalidRequestError("this model does not take images")
                refs.append(image_ref(part))
                heads.append(placeholder + "\n")
            else:
                raise InvalidRequestError(f"unsupported message content part type {kind!r}")
        out.append({**message, "content": "".join(heads) + "".join(texts)})
    return out, refs


def resolve_images(refs: list[Any], limits: ImageLimits) -> list[Any]:
    """PIL images from references (blocking for URLs: run it in a thread)."""
    return [
        load_image_url(r, limits) if isinstance(r, str) else check_image(r, limits) for r in refs
    ]


def chat_prompt(
    engine: Any,
    render: Callable[[list[dict[str, Any]]], list[int]],
    messages: list[dict[str, Any]],
) -> list[int] | dict[str, Any]:
    """The offline ``LLM.chat`` prompt of one conversation: its token ids (``render`` of
    the flattened messages), with ``multi_modal_data`` when it has images."""
    processor = engine.multimodal
    placeholder = processor.placeholder_text if processor is not None else None
    flat, refs = split_messages(messages, placeholder)
    ids = render(flat)
    if not refs:
        return ids
    images = resolve_images(refs, processor.limits)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}
