"""The ``random`` weight format: directories written by the ``random:<preset>`` source.

Such a directory holds a config and a tokenizer but no tensors. ``iter_weights`` returns a
:class:`RandomWeights`, an empty stream that tells the loader to fill the parameters
itself, on the device the model was built on (an 8B model fills in well under a second on
a GPU, where streaming random tensors from the host would take tens of seconds).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from tessellm.formats.safetensors import SafetensorsFormat
from tessellm.sources.random_weights import DEFAULT_STD, MARKER_FILE


class RandomWeights(Iterator[tuple[str, torch.Tensor]]):
    """No tensors: the loader calls :meth:`fill` on the model instead.

    Matrices (embeddings, projections, the LM head) get N(0, ``std``) from a generator
    seeded with ``seed``; vectors (norm scales, biases) keep the values their layers were
    built with (ones and zeros), as a freshly initialised network has them. Non-float
    parameters (packed quantized storage) are left alone.
    """

    def __init__(self, seed: int = 0, std: float = DEFAULT_STD) -> None:
        self.seed = seed
        self.std = std

    def __next__(self) -> tuple[str, torch.Tensor]:
        raise StopIteration

    @torch.no_grad()
    def fill(self, model: nn.Module) -> set[str]:
        generators: dict[torch.device, torch.Generator] = {}
        names = set()
        for name, param in model.named_parameters():
            names.add(name)
            if param.dim() < 2 or not param.is_floating_point():
                continue
            gen = generators.get(param.device)
            if gen is None:
                gen = generators[param.device] = torch.Generator(device=param.device)
                gen.manual_seed(self.seed)
            param.normal_(0.0, self.std, generator=gen)
        return names


class RandomWeightsFormat(SafetensorsFormat):
    """Config and tokenizer as in any HF directory; the weights are random."""

    name = "random"

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and (path / MARKER_FILE).exists() and (path / "config.json").exists()

    def iter_weights(self, path: Path, config, dtype: torch.dtype) -> RandomWeights:
        marker = json.loads((path / MARKER_FILE).read_text())
        return RandomWeights(int(marker.get("seed", 0)), float(marker.get("std", DEFAULT_STD)))
