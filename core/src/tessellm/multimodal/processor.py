"""The engine's side of image input: images through the model's image processor, the
prompt's placeholders expanded to the rows each image takes (``interfaces/multimodal.py``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tessellm.errors import ConfigError, InvalidRequestError
from tessellm.interfaces.multimodal import ImageInput, MultiModalModel
from tessellm.multimodal.images import ImageLimits, check_image


def hash_pixels(pixel_values: torch.Tensor, extras: dict[str, Any]) -> bytes:
    """What the vision encoder sees, as a digest: shape, dtype, values, extras."""
    digest = hashlib.blake2b(digest_size=16)
    tensor = pixel_values.detach().cpu().contiguous()
    digest.update(repr((tuple(tensor.shape), str(tensor.dtype), sorted(extras))).encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())
    for key in sorted(extras):
        value = extras[key]
        raw = value.cpu().numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value)
        digest.update(raw if isinstance(raw, bytes) else raw.encode())
    return digest.digest()


@dataclass(slots=True)
class ProcessedImages:
    """``multi_modal_data`` already through ``MultiModalProcessor.process`` (the server
    does that off the engine thread): the expanded token ids it was made for, and the
    images. ``add_request`` takes it in place of ``{"image": ...}``."""

    token_ids: list[int]
    images: list[ImageInput]


class MultiModalProcessor:
    """Turns ``(prompt token ids, {"image": ...})`` into expanded token ids and
    :class:`ImageInput` s, for a model class that is a :class:`MultiModalModel`."""

    def __init__(
        self,
        model_cls: type[MultiModalModel],
        config: Any,
        path: Path,
        tokenizer: Any,
        limits: ImageLimits | None = None,
    ) -> None:
        from transformers import AutoImageProcessor

        self.model_cls = model_cls
        self.config = config
        self.limits = limits or ImageLimits.from_env()
        self.image_token_id = int(model_cls.image_token_id(config))
        # The text a chat message's image part becomes (e.g. "<image>").
        self.placeholder_text: str = tokenizer.convert_ids_to_tokens(self.image_token_id)
        try:
            # The model folder's own processor config; never remote code.
            self.image_processor = AutoImageProcessor.from_pretrained(
                str(path), trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{path} has no image processor config (preprocessor_config.json) that "
                f"transformers can read: {exc}"
            ) from exc

    def _images(self, data: Any) -> list[Any]:
        if not isinstance(data, dict):
            raise InvalidRequestError("multi_modal_data must be a dict like {'image': image}")
        unknown = sorted(set(data) - {"image"})
        if unknown:
            raise InvalidRequestError(
                f"unsupported multi_modal_data key(s) {', '.join(unknown)}: this model takes "
                "'image'"
            )
        images = data.get("image")
        if images is None:
            return []
        images = list(images) if isinstance(images, list | tuple) else [images]
        if len(images) > self.limits.max_images_per_prompt:
            raise InvalidRequestError(
                f"{len(images)} images in one prompt, more than the limit of "
                f"{self.limits.max_images_per_prompt}"
            )
        return [check_image(image, self.limits).convert("RGB") for image in images]

    def process(self, token_ids: list[int], data: Any) -> tuple[list[int], list[ImageInput]]:
        """Expanded token ids and one ``ImageInput`` per image (``InvalidRequestError``
        for images the prompt has no placeholder for, or placeholders without an image).

        Either every image has one placeholder token, which expands to its rows, or the
        prompt is already expanded (as a processor's output is): as many placeholder
        tokens as all the images' rows, each image's in one run."""
        images = self._images(data)
        positions = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if not images and not positions:
            return token_ids, []
        if not images or len(positions) < len(images):
            raise self._mismatch(len(positions), len(images))
        inputs = self._run_processor(images)
        sizes = [self.model_cls.num_image_tokens(self.config, image) for image in inputs]
        if len(positions) == len(images):
            out: list[int] = []
            cursor = 0
            for position, image, size in zip(positions, inputs, sizes, strict=True):
                out.extend(token_ids[cursor:position])
                image.offset, image.length = len(out), size
                out.extend([self.image_token_id] * size)
                cursor = position + 1
            out.extend(token_ids[cursor:])
            return out, inputs
        if len(positions) != sum(sizes):
            raise self._mismatch(len(positions), len(images))
        first = 0
        for image, size in zip(inputs, sizes, strict=True):
            offset = positions[first]
            if positions[first + size - 1] != offset + size - 1:
                raise InvalidRequestError(
                    f"the image placeholders at position {offset} are not one run of the "
                    f"image's {size} tokens; give one {self.placeholder_text!r} per image"
                )
            image.offset, image.length = offset, size
            first += size
        return list(token_ids), inputs

    def _mismatch(self, placeholders: int, images: int) -> InvalidRequestError:
        return InvalidRequestError(
            f"the prompt has {placeholders} image placeholder(s) ({self.placeholder_text!r}) "
            f"but {images} image(s) were given"
        )

    def _run_processor(self, images: list[Any]) -> list[ImageInput]:
        try:
            batch = self.image_processor(images=images, return_tensors="pt")
        except Exception as exc:  # a processor refusing an image is the client's problem
            raise InvalidRequestError(f"the image processor refused the image: {exc}") from None
        pixel_values = batch["pixel_values"]
        extras_names = [k for k in batch if k != "pixel_values"]
        inputs = []
        for i in range(len(images)):
            pixels = pixel_values[i]
            extras = {k: batch[k][i] for k in extras_names}
            inputs.append(ImageInput(0, 0, hash_pixels(pixels, extras), pixels, extras))
        return inputs


def build_processor(
    plugins: Any, config: Any, path: Path, tokenizer: Any, args: Any
) -> MultiModalProcessor | None:
    """The processor for a model that takes images; None for any other model."""
    from tessellm import model_loader as ml

    model_cls = ml.model_class(plugins, config)
    if not (isinstance(model_cls, type) and issubclass(model_cls, MultiModalModel)):
        return None
    if args.pipeline_parallel_size > 1:
        # Pipeline stages take hidden states, not input embeddings, from the stage before.
        raise ConfigError("vision-language models do not run with pipeline parallelism yet")
    return MultiModalProcessor(model_cls, config, path, tokenizer)


def attach_images(
    processor: MultiModalProcessor | None, token_ids: list[int], data: Any
) -> tuple[list[int], list[ImageInput]]:
    """The prompt's token ids with image placeholders expanded, and its images."""
    if data is None:
        if processor is not None and processor.image_token_id in token_ids:
            raise InvalidRequestError(
                f"the prompt has image placeholders ({processor.placeholder_text!r}) but no "
                "image was given"
            )
        return token_ids, []
    if processor is None:
        raise InvalidRequestError("this model does not take images (multi_modal_data)")
    if isinstance(data, ProcessedImages):
        if data.token_ids != token_ids:
            raise InvalidRequestError("processed images given with another prompt")
        return token_ids, data.images
    return processor.process(token_ids, data)


def block_key(images: list[ImageInput], block_index: int, block_size: int) -> bytes:
    """The content hashes of the images that start in block ``block_index``: the block
    hash chain carries them to every later block."""
    lo, hi = block_index * block_size, (block_index + 1) * block_size
    return b"".join(b"\x00img:" + m.content_hash for m in images if lo <= m.offset < hi)
