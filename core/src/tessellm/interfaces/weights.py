"""Where models come from (sources) and how checkpoints are read (weight formats)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase


class ModelSource(ABC):
    """Turns the user's ``model=`` string into a local file or directory."""

    name: ClassVar[str]

    @abstractmethod
    def matches(self, model: str) -> bool:
        """Whether this source handles ``model`` (cheap: no download)."""

    @abstractmethod
    def resolve(self, model: str, cache_dir: Path) -> Path:
        """A local path for ``model``, fetching it into ``cache_dir`` if needed."""

    def aliases(self) -> list[str]:
        """Names this source offers (for help texts)."""
        return []


class WeightFormat(ABC):
    """Reads one checkpoint format: config, tokenizer and tensors under HF names."""

    name: ClassVar[str]

    @abstractmethod
    def accepts(self, path: Path) -> bool:
        """Whether this format reads ``path`` (cheap: look at names, not contents)."""

    @abstractmethod
    def load_config(self, path: Path) -> PretrainedConfig: ...

    @abstractmethod
    def load_tokenizer(self, path: Path) -> PreTrainedTokenizerBase: ...

    @abstractmethod
    def iter_weights(
        self, path: Path, config: PretrainedConfig, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, tensor)`` pairs with names as the HF transformers model uses them."""
