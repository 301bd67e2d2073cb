"""Images from what a client sends (data URLs, bytes, PIL images), with size limits.

The limits guard the server: an encoded image larger than ``max_image_bytes`` is refused
before it is decoded, and one of more than ``max_image_pixels`` pixels is refused from its
header, before its pixels are decoded (a small PNG can claim billions of pixels). http(s)
URLs are fetched only for hosts named in ``TESSELLM_ALLOWED_MEDIA_DOMAINS`` (comma
separated; vLLM's ``--allowed-media-domains``): by default a server never fetches a
URL a client names.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from tessellm.errors import InvalidRequestError

ALLOWED_DOMAINS_ENV = "TESSELLM_ALLOWED_MEDIA_DOMAINS"
FETCH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images_per_prompt: int = 16

    @classmethod
    def from_env(cls) -> ImageLimits:
        """Defaults, or ``TESSELLM_MAX_IMAGE_BYTES`` / ``_PIXELS`` / ``_IMAGES_PER_PROMPT``."""
        names = {
            "max_image_bytes": "TESSELLM_MAX_IMAGE_BYTES",
            "max_image_pixels": "TESSELLM_MAX_IMAGE_PIXELS",
            "max_images_per_prompt": "TESSELLM_MAX_IMAGES_PER_PROMPT",
        }
        values = {k: int(os.environ[v]) for k, v in names.items() if os.environ.get(v)}
        return cls(**values)


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with vision families
        raise InvalidRequestError(
            "image input needs Pillow (pip install pillow), which this server lacks"
        ) from exc
    return Image


def check_image(image: Any, limits: ImageLimits) -> Any:
    """``image`` if it is a PIL image within the pixel limit (``InvalidRequestError``
    otherwise)."""
    image_cls = _pil().Image
    if not isinstance(image, image_cls):
        raise InvalidRequestError(f"an image must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise InvalidRequestError(
            f"the image has {width}x{height} pixels, more than the limit of "
            f"{limits.max_image_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidRequestError("the image is empty")
    return image


def decode_image(data: bytes, limits: ImageLimits) -> Any:
    """A decoded (loaded, RGB) PIL image from encoded bytes (PNG, JPEG, ...)."""
    if len(data) > limits.max_image_bytes:
        raise InvalidRequestError(
            f"the image is {len(data)} bytes, more than the limit of {limits.max_image_bytes}"
        )
    pil = _pil()
    try:
        image = pil.open(io.BytesIO(data))
        check_image(image, limits)  # from the header, before the pixels are decoded
        image.load()
    except InvalidRequestError:
        raise
    except Exception as exc:  # Pillow raises many kinds for corrupt input
        raise InvalidRequestError(f"the image could not be decoded: {exc}") from None
    return image.convert("RGB")


def decode_data_url(url: str, limits: ImageLimits) -> Any:
    """``data:image/...;base64,...`` to a PIL image."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise InvalidRequestError("an image data URL must be data:<type>;base64,<data>")
    # Base64 is 4/3 of the bytes: refuse before decoding what would be over the limit.
    if len(payload) > limits.max_image_bytes * 4 // 3 + 4:
        raise InvalidRequestError(
            f"the image is more than the limit of {limits.max_image_bytes} bytes"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("the image data URL is not valid base64") from None
    return decode_image(data, limits)


def allowed_domains() -> set[str]:
    raw = os.environ.get(ALLOWED_DOMAINS_ENV, "")
    return {d.strip().lower() for d in raw.split(",") if d.strip()}


def fetch_image_url(url: str, limits: ImageLimits) -> Any:
    """An http(s) image, fetched only from an allowed host (blocking: run it in a thread)."""
    parsed = urllib.parse.urlsplit(url)
    host = (parsed.hostname or "").lower()
    allowed = allowed_domains()
    if host not in allowed:
        raise InvalidRequestError(
            f"this server does not fetch image URLs from {host or 'that host'!r}; send the "
            f"image as a data URL (data:image/png;base64,...) or start the server with "
            f"{ALLOWED_DOMAINS_ENV} naming the host"
        )
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            data = response.read(limits.max_image_bytes + 1)
    except OSError as exc:
        raise InvalidRequestError(f"the image URL could not be fetched: {exc}") from None
    return decode_image(data, limits)


def load_image_url(url: str, limits: ImageLimits) -> Any:
    """A data URL or an (allowed) http(s) URL to a PIL image."""
    if not isinstance(url, str) or not url:
        raise InvalidRequestError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        return decode_data_url(url, limits)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_image_url(url, limits)
    raise InvalidRequestError(
        f"unsupported image URL scheme {scheme!r}: send a data URL (data:image/png;base64,...)"
    )
