"""Hugging Face directories: config.json, tokenizer files and ``*.safetensors`` shards.

Pickle-based checkpoints (``*.bin``, ``*.pt``) are refused: loading them can run code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import WeightFormat

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_no_remote_code(config) -> None:
    if getattr(config, "auto_map", None):
        raise ModelLoadError(
            "this model needs custom code from its repository (auto_map in config.json); "
            "tessellm never runs remote code"
        )


class SafetensorsFormat(WeightFormat):
    name = "safetensors"

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").exists()

    def load_config(self, path: Path):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        check_no_remote_code(config)
        return config

    def load_tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)

    def iter_weights(
        self, path: Path, config, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ModelLoadError(
                    f"{path} holds only pickle checkpoints ({', '.join(pickles)}); tessellm "
                    "loads safetensors only, since unpickling can run arbitrary code. "
                    "Convert them to safetensors first."
                )
            raise ModelLoadError(f"no *.safetensors files in {path}")
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
