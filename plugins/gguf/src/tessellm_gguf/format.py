"""Reads a ``.gguf`` file: the config, tokenizer and chat template from its metadata, and its
tensors renamed to Hugging Face names.

transformers' GGUF integration supplies the metadata-to-config and tokenizer conversion and
the tensor-name mapping (including the reverse of llama.cpp's Q/K row permutation), so the
weights come out exactly as the HF reference model sees them.

The config says ``quantization_config = {"quant_method": "gguf"}`` for the architectures
whose quantized matrices load natively (``native_weights.py``): the engine then picks the
``gguf`` quantization method, and the linear weights come out as raw blocks. When another
method is chosen the engine clears ``quantization_config`` and every tensor comes out
dequantized (by the ``gguf`` package, through the conversion cache).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import WeightFormat
from tessellm_gguf.conversion_cache import cached_config, cached_tokenizer, cached_weights
from tessellm_gguf.metadata_once import forget, read_once
from tessellm_gguf.native_weights import iter_native_weights, supports_native

GGUF_QUANTIZATION = {"quant_method": "gguf"}


def _split(path: Path) -> tuple[str, str]:
    return str(path.parent), path.name


def gguf_damage(path: Path) -> str | None:
    """What is wrong with ``path`` as a GGUF file, or None if its layout is whole.

    Called when a conversion fails: the ``gguf`` reader maps every tensor as it opens a
    file, so a file cut short fails with numpy's "cannot reshape array", which does not
    say that the tensor data is missing.
    """
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    extents: list[int] = []

    class ExtentReader(GGUFReader):
        """Parses the metadata and tensor table; records where each tensor ends instead of
        mapping it."""

        def _build_tensors(self, start_offs: int, fields) -> None:
            for field in fields:
                _name_len, _name, _n_dims, dims, raw_dtype, offset = field.parts
                block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_dtype[0])]
                n_bytes = int(np.prod(dims)) * type_size // block_size
                extents.append(start_offs + int(offset[0]) + n_bytes)

    size = path.stat().st_size
    try:
        ExtentReader(path)
    except Exception as exc:  # any parse failure means damaged metadata
        return f"its header or metadata cannot be parsed ({exc}); truncated or not a GGUF file"
    needed = max(extents, default=0)
    if needed > size:
        return (
            f"its tensor data is truncated: the tensors need {needed} bytes but the file has "
            f"{size} ({needed - size} missing; an interrupted download? fetch it again)"
        )
    return None


def _load_error(path: Path, what: str, exc: Exception) -> ModelLoadError:
    damage = gguf_damage(path)
    if damage is not None:
        return ModelLoadError(f"{path} is damaged: {damage}")
    text = str(exc).strip().splitlines()
    return ModelLoadError(f"cannot read GGUF {what} of {path}: {text[0] if text else exc!r}")


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    if isinstance(qc, dict):
        return qc.get("quant_method")
    return getattr(qc, "quant_method", None)


class GGUFFormat(WeightFormat):
    name = "gguf"

    def accepts(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def load_config(self, path: Path):
        config = cached_config(path, lambda: self._convert_config(path))
        # Set on every load, never cached: the converted config stays the file's own.
        if supports_native(config):
            config.quantization_config = dict(GGUF_QUANTIZATION)
        return config

    def _convert_config(self, path: Path):
        from transformers import AutoConfig

        from tessellm.model_loader import architecture_of

        folder, name = _split(path)
        try:
            with read_once():
                config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        except Exception as exc:
            raise _load_error(path, "metadata", exc) from None
        if not getattr(config, "architectures", None):
            config.architectures = [architecture_of(config)]
        return config

    def load_tokenizer(self, path: Path):
        return cached_tokenizer(path, lambda: self._convert_tokenizer(path))

    def _convert_tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        folder, name = _split(path)
        try:
            with read_once():
                return AutoTokenizer.from_pretrained(
                    folder, gguf_file=name, trust_remote_code=False
                )
        except Exception as exc:
            raise _load_error(path, "tokenizer", exc) from None
        finally:
            forget()  # the config, converted first, has had its share

    def iter_weights(
        self, path: Path, config, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        if _quant_method(config) == "gguf":
            return self._native_weights(path, config, dtype)
        return cached_weights(path, dtype, lambda: self._convert_weights(path, config))

    def _native_weights(
        self, path: Path, config, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        try:
            yield from iter_native_weights(path, config, dtype)
        except (ValueError, KeyError, struct.error) as exc:
            raise _load_error(path, "tensors", exc) from None

    def _convert_weights(self, path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # A weightless HF model tells transformers which names the tensors map to.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        try:
            result = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
        except Exception as exc:
            raise _load_error(path, "tensors", exc) from None
        for name, tensor in result["tensors"].items():
            if not isinstance(tensor, torch.Tensor):
                tensor = torch.from_numpy(tensor)
            yield name, tensor
