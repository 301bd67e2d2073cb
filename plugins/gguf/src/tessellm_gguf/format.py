"""Reads a ``.gguf`` file: the config, tokenizer and chat template from its metadata, and its
tensors dequantized (by the ``gguf`` package) and renamed to Hugging Face names.

transformers' GGUF integration supplies the metadata-to-config and tokenizer conversion and
the tensor-name mapping (including the reverse of llama.cpp's Q/K row permutation), so the
weights come out exactly as the HF reference model sees them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import WeightFormat
from tessellm_gguf.conversion_cache import cached_config, cached_tokenizer, cached_weights


def _split(path: Path) -> tuple[str, str]:
    return str(path.parent), path.name


class GGUFFormat(WeightFormat):
    name = "gguf"

    def accepts(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def load_config(self, path: Path):
        return cached_config(path, lambda: self._convert_config(path))

    def _convert_config(self, path: Path):
        from transformers import AutoConfig

        from tessellm.model_loader import architecture_of

        folder, name = _split(path)
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"cannot read GGUF metadata of {path}: {exc}") from exc
        if not getattr(config, "architectures", None):
            config.architectures = [architecture_of(config)]
        return config

    def load_tokenizer(self, path: Path):
        return cached_tokenizer(path, lambda: self._convert_tokenizer(path))

    def _convert_tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        folder, name = _split(path)
        return AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)

    def iter_weights(
        self, path: Path, config, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        return cached_weights(path, dtype, lambda: self._convert_weights(path, config))

    def _convert_weights(self, path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        # A weightless HF model tells transformers which names the tensors map to.
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        result = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
        for name, tensor in result["tensors"].items():
            if not isinstance(tensor, torch.Tensor):
                tensor = torch.from_numpy(tensor)
            yield name, tensor
