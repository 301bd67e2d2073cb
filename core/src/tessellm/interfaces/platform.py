"""Hardware platforms: cheap detection plus the few device facts the engine needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch


class Platform(ABC):
    """One kind of device. Subclasses set the class attributes and implement the methods.

    ``is_available`` must not import heavy modules or initialise the device: it runs for
    every installed platform each time the engine chooses one.
    """

    name: ClassVar[str]
    device_type: ClassVar[str]  # the torch device type: "cpu", "cuda", "xla"
    priority: ClassVar[int] = 0  # higher wins when several are available
    distributed_backend: ClassVar[str] = "gloo"
    attention_backends: ClassVar[tuple[str, ...]] = ("torch",)  # preference order

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this machine can run the platform."""

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why ``is_available`` said no, for ``tessellm plugins``."""
        return "not available on this machine"

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type)

    @abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The fastest dtype this device computes well (used for ``dtype="auto"``)."""

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def set_up_process(self) -> None:  # noqa: B027 - optional hook
        """Per-process set-up (threads, allocator settings) before the model is built."""

    @abstractmethod
    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        """Bytes the KV cache may take, given a utilisation fraction and the model's size."""

    def graph_runner(self, model: Any) -> Callable[..., Any] | None:
        """An optional wrapper that captures and replays decode steps (CUDA graphs)."""
        return None
