"""Core's own seams: scheduler, KV cache manager and executor (each replaceable by plugins)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tessellm.engine.request import Request
    from tessellm.engine.schedule import SchedulerOutput, StepResult


class KVCacheManagerInterface(Protocol):
    """Hands out KV blocks to requests; the scheduler asks before it commits."""

    num_blocks: int
    block_size: int

    def get_computed_blocks(self, request: Request) -> int:
        """Attach cached prefix blocks to a new request; returns the number of cached tokens."""

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool: ...

    def allocate(self, request: Request, num_new_tokens: int) -> None: ...

    def free(self, request: Request) -> None: ...

    def usage(self) -> float:
        """Fraction of blocks held by running requests."""


class SchedulerInterface(Protocol):
    def add_request(self, request: Request) -> None: ...

    def abort_requests(self, request_ids: list[str]) -> list[Request]: ...

    def schedule(self) -> SchedulerOutput: ...

    def update(self, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Apply sampled tokens; returns the requests that changed (finished ones included)."""

    def has_unfinished(self) -> bool: ...


class ExecutorInterface(Protocol):
    def execute(self, plan: SchedulerOutput) -> StepResult: ...

    def shutdown(self) -> None: ...
