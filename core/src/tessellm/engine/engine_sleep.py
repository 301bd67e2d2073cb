"""The engine's sleep mode (vLLM's names): give the device's memory back while idle."""

from __future__ import annotations

import time
from typing import Any

from tessellm.errors import ConfigError, InvalidRequestError


class EngineSleep:
    """``LLMEngine.sleep`` / ``wake_up``; reads the engine's executor, KV cache manager,
    structured-output state and ``sleep_level``."""

    executor: Any
    kv_cache_manager: Any
    structured: Any
    output_processor: Any
    sleep_level: int

    def has_unfinished_requests(self) -> bool:
        raise NotImplementedError

    def sleep(self, level: int = 1) -> float:
        """Give the device's memory back while idle: level 1 frees the KV cache and moves
        the weights to host memory, level 2 frees both. Requests are refused
        (``EngineSleepingError``) until ``wake_up``. Returns the seconds it took."""
        if level not in (1, 2):
            raise InvalidRequestError(f"sleep level must be 1 or 2, got {level!r}")
        if self.sleep_level:
            return 0.0
        if self.has_unfinished_requests():
            raise InvalidRequestError("requests are running; the engine sleeps only when idle")
        if not self.executor.supports_sleep:
            raise ConfigError(f"the {type(self.executor).__name__} executor cannot sleep")
        start = time.monotonic()
        self.structured.sweep(self.output_processor)
        if not self.kv_cache_manager.reset_prefix_cache():
            raise ConfigError(
                f"{type(self.kv_cache_manager).__name__} cannot forget its prefix cache, "
                "which sleep needs (the KV it points to is freed)"
            )
        self.executor.sleep(level)
        self.sleep_level = level
        return time.monotonic() - start

    def wake_up(self) -> float:
        """Restore what ``sleep`` freed; returns the seconds it took."""
        if not self.sleep_level:
            return 0.0
        start = time.monotonic()
        self.executor.wake_up()
        self.sleep_level = 0
        return time.monotonic() - start
