"""The engine's own seams: executor, scheduler and KV cache manager, each replaceable by a
plugin, and the data that crosses them.

``LLMEngine`` calls nothing on these objects beyond what is declared here. Optional
behaviour is a class-level capability attribute (``False`` in the base class); the engine
reads it once, at construction, and never probes for methods. A plugin subclasses the
base class and implements its abstract members; the engine refuses (``PluginError``) a
registered class that is not a subclass, leaves an abstract member out, or claims a
capability without the members it needs.

One step: ``Scheduler.schedule()`` plans it (a ``SchedulerOutput``, which holds block
tables the ``KVCacheManager`` handed out), ``Executor.execute(plan)`` (or ``launch``) runs
the model and samples (a ``StepResult``), ``Scheduler.update(plan, result)`` appends the
tokens and finishes requests.

The executor seam and its launch handles live in ``tessellm.interfaces.executor``; they are
re-exported here, the path plugins import every seam from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tessellm.errors import PluginError, TessellmError
from tessellm.interfaces.executor import CompletedStep, DeferredSampling, Executor, PendingResult
from tessellm.interfaces.request import Request, RequestStatus
from tessellm.interfaces.schedule import (
    PLACEHOLDER_TOKEN,
    ScheduledSeq,
    SchedulerConfig,
    SchedulerOutput,
    StepResult,
    TokenLogprobs,
)

__all__ = [
    "PLACEHOLDER_TOKEN",
    "CompletedStep",
    "DeferredSampling",
    "Executor",
    "KVCacheManager",
    "PendingResult",
    "Request",
    "RequestStatus",
    "RequestUpdateError",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepResult",
    "TokenLogprobs",
    "check_implementation",
]


class KVCacheManager(ABC):
    """Hands out KV cache blocks to requests, and finds cached prefixes.

    Constructed by the engine as ``cls(num_blocks, block_size, enable_prefix_caching)``
    (the base ``__init__`` stores the three; call it). Only the scheduler calls it, always
    ``can_allocate`` before ``allocate``.

    Data contract: the manager owns ``Request.block_ids``, the blocks holding a request's
    KV in position order (block ``i`` holds positions ``i * block_size`` up to
    ``(i + 1) * block_size``); every method that hands out or takes back blocks writes it,
    and the scheduler copies it into ``ScheduledSeq.block_ids`` for the executor. The
    manager reads ``Request.num_computed_tokens`` (positions whose KV is written or being
    written this step) and may keep its own bookkeeping in ``Request.block_hashes``.
    Blocks are ids in ``range(num_blocks)``; the executor's cache holds as many.
    """

    supports_schedule_ahead: bool = False
    """Whether ``allocate`` copes with a ``PLACEHOLDER_TOKEN`` as a request's last output token
    (schedule-ahead): it must not publish, as a prefix-cache hit, a block whose tokens include it
    until ``publish_filled`` says the token is known. A manager without a prefix cache can set it
    ``True`` as is."""

    supports_cache_layouts: bool = False
    """Whether the constructor takes a keyword ``layout`` (``engine.cache_layout.CacheLayout``)
    and serves layouts with several KV groups, windowed groups that free their old blocks,
    and recurrent-state slots (``Request.group_block_ids``, ``Request.state_slot``). A
    manager without it serves plain layouts only; the engine refuses other models with it."""

    supports_sample_forks: bool = False
    """Whether ``fork`` serves ``n > 1``: the samples of a request take copies of the
    leader's recurrent state and share its blocks instead of computing the prompt again
    (``engine/sample_fork.py``). Without it they compute it (through prefix hits where the
    cache has them)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        """Blocks in the pool (the executor's cache was sized for this many)."""
        self.block_size = block_size
        """Tokens per block."""
        self.enable_prefix_caching = enable_prefix_caching
        """Whether requests may share the blocks of a common prefix."""

    @abstractmethod
    def get_computed_blocks(self, request: Request) -> int:
        """Attach the longest cached prefix of a request that holds no blocks (sets its
        ``block_ids`` to the hits); return how many tokens need no compute: a multiple of
        ``block_size``, and less than ``request.num_tokens`` (the last token is always
        computed, for its logits). Return 0 with nothing attached if there is no cache."""

    @abstractmethod
    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Whether ``allocate(request, num_new_tokens)`` would succeed now. Changes nothing."""

    @abstractmethod
    def allocate(self, request: Request, num_new_tokens: int) -> None:
        """Extend ``request.block_ids`` to cover positions up to ``num_computed_tokens +
        num_new_tokens`` (the tokens the coming step computes). Only after
        ``can_allocate`` said yes for the same arguments."""

    @abstractmethod
    def free(self, request: Request) -> None:
        """Take back every block of the request and empty ``request.block_ids``. Called on
        finish, abort and preemption, before the scheduler resets the request's progress:
        ``num_computed_tokens`` still says which blocks hold written KV."""

    @abstractmethod
    def usage(self) -> float:
        """Fraction of the blocks that requests hold (0.0 to 1.0), for stats and metrics."""

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (the KV it pointed to is gone: engine sleep). Only
        while no request holds blocks; returns whether it did. The default: False (the
        engine then refuses to sleep)."""
        return False

    def fork(self, leader: Request, sample: Request) -> bool:
        """``supports_sample_forks`` only: give ``sample`` (nothing computed) what
        ``leader`` will hold once the coming step computes its prompt (a state slot, the
        leader's full blocks with one more reference each, a fresh block for a partial
        last one); the runner copies the leader's state and partial blocks after the
        step's forward. Return False holding nothing where it cannot (the sample then
        computes the prompt). The default: False."""
        return False

    def publish_filled(self, request: Request) -> None:  # noqa: B027 - optional hook
        """Schedule-ahead only (``supports_schedule_ahead``): the placeholder that was the
        request's last output token when a block was allocated is now its real token;
        publish a block it completed. The default does nothing (right for a manager
        without a prefix cache)."""


class RequestUpdateError(TessellmError):
    """Raised by ``Scheduler.update`` (or ``fill``) when applying a step's result failed
    for some requests only: every other seq of the plan was applied, and ``changed`` is what
    the call would have returned for them. ``errors`` maps each request id that failed to
    its exception; the engine fails those requests and carries on."""

    def __init__(self, changed: list[Request], errors: dict[str, Exception]) -> None:
        super().__init__("; ".join(f"{rid}: {type(e).__name__}: {e}" for rid, e in errors.items()))
        self.changed = changed
        self.errors = errors


class Scheduler(ABC):
    """Decides, each step, which requests compute which tokens, within the token budget,
    the sequence limit and the KV blocks the manager has.

    Constructed by the engine as ``cls(config, kv_cache_manager)`` (the base ``__init__``
    stores both; call it). The scheduler owns each request's progress
    (``Request.status``, ``num_computed_tokens``, ``output_token_ids``) and is the only
    caller of the KV cache manager.
    """

    supports_schedule_ahead: bool = False
    """Whether ``advance`` and ``fill`` are implemented: the engine may then schedule a step before
    the running step's tokens are known (with an asynchronous executor that ``feeds_sampled_tokens``
    and a KV cache manager that ``supports_schedule_ahead``)."""

    supports_speculation: bool = False
    """Whether ``speculation_candidates`` is implemented and ``schedule``/``update`` honour
    speculative drafts: a decoding request's ``spec_token_ids`` go into its seq's
    ``token_ids`` and ``draft_token_ids`` (as many as fit, or none), and ``update`` appends
    the accepted drafts before the sampled token and counts only them as computed."""

    supports_concurrent_batches: bool = False
    """Whether ``schedule`` honours ``SchedulerConfig.max_concurrent_batches`` > 1 (pipeline
    parallelism): the engine ``advance``s each plan as it launches it and ``fill``s it when
    its tokens are back, with several plans in flight; ``schedule`` then leaves out every
    request whose last output token is still a ``PLACEHOLDER_TOKEN`` (its token is being
    computed), so plans in flight never share a sampling request. Needs ``advance``,
    ``fill`` and ``rewind``."""

    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager

    @abstractmethod
    def add_request(self, request: Request) -> None:
        """Queue a new request. Raise ``InvalidRequestError`` for one that can never run
        (e.g. a prompt that leaves no room to generate)."""

    def abort_requests(self, request_ids: list[str]) -> list[Request]:
        """Finish these requests as aborted (ids not known are skipped); return those
        finished. The default calls ``finish_requests`` with ``FINISHED_ABORTED``."""
        return self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    @abstractmethod
    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Finish these requests with ``status`` (the engine passes ``FINISHED_STOPPED``
        for a stop string it found in the text): drop them from the queues, free their
        blocks, set their status; skip ids not known. Return those finished."""

    @abstractmethod
    def schedule(self) -> SchedulerOutput:
        """Plan the next step: allocate blocks (preempting if needed) and return what each
        scheduled request computes. An empty plan (no ``seqs``) is valid."""

    @abstractmethod
    def update(self, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Apply a step's result: advance progress by the tokens computed, append the
        sampled tokens (``result.sampled_token_ids``, one per seq with ``sample=True``, in
        plan order) and finish requests that stop (EOS, stop tokens, ``max_tokens``,
        length). Skip seqs whose request finished meanwhile. Return the requests that got
        a token, finished ones included.

        A failure for one request should raise ``RequestUpdateError`` once the others are
        applied: the engine then fails that request alone. Any other exception stops the
        engine (it cannot tell which requests' progress was applied)."""

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""

    @abstractmethod
    def stats(self) -> dict[str, float]:
        """Counters for ``LLMEngine.stats()`` and the server's metrics. Keys the metrics
        read when present: ``num_running``, ``num_waiting``, ``num_preemptions``,
        ``kv_cache_usage``, ``prefix_cache_queried_tokens``, ``prefix_cache_hit_tokens``
        (``docs/scheduling.md`` lists the default scheduler's)."""

    def speculation_candidates(self) -> list[Request]:
        """Speculative decoding (``supports_speculation``): the running requests whose next
        step decodes (every known token but the last computed): the engine may give them
        ``spec_token_ids`` right before ``schedule()``."""
        raise NotImplementedError(f"{type(self).__name__} does not support speculation")

    def advance(self, plan: SchedulerOutput) -> None:
        """Schedule-ahead (``supports_schedule_ahead``): count ``plan`` as computed before
        its tokens are known, giving each sampling request a ``PLACEHOLDER_TOKEN`` output
        token, so that ``schedule()`` can plan the next step now."""
        raise NotImplementedError(f"{type(self).__name__} does not support schedule-ahead")

    def rewind(self, plan: SchedulerOutput) -> None:
        """``supports_concurrent_batches``: undo ``advance(plan)`` for a plan whose result
        will never be applied (a plan in flight when an earlier one failed): its running
        requests count its tokens as not computed again and lose its placeholder."""
        raise NotImplementedError(f"{type(self).__name__} does not support concurrent batches")

    def fill(self, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Schedule-ahead: replace the placeholders ``advance(plan)`` left with the sampled
        tokens, finish what stops and call ``KVCacheManager.publish_filled`` for each
        request still running. Returns what ``update`` returns."""
        raise NotImplementedError(f"{type(self).__name__} does not support schedule-ahead")

    @classmethod
    def _capability_gaps(cls) -> list[str]:
        gaps = []
        if cls.supports_schedule_ahead and (
            cls.advance is Scheduler.advance or cls.fill is Scheduler.fill
        ):
            gaps.append("advance and fill (it sets supports_schedule_ahead = True)")
        if cls.supports_speculation and (
            cls.speculation_candidates is Scheduler.speculation_candidates
        ):
            gaps.append("speculation_candidates (it sets supports_speculation = True)")
        if cls.supports_concurrent_batches and (
            cls.advance is Scheduler.advance
            or cls.fill is Scheduler.fill
            or cls.rewind is Scheduler.rewind
        ):
            gaps.append("advance, fill and rewind (it sets supports_concurrent_batches = True)")
        return gaps


def check_implementation(cls: object, base: type, what: str) -> None:
    """Raise ``PluginError`` unless ``cls`` is a concrete subclass of ``base`` that has
    the members its capability attributes promise. ``what`` names it in the message
    (e.g. ``executor 'fast' from plugin 'tessellm-fast'``)."""
    # A seam is named where plugins import it from (Executor's own module is interfaces.executor).
    module = __name__ if globals().get(base.__name__) is base else base.__module__
    where = f"{module}.{base.__qualname__}"
    if not (isinstance(cls, type) and issubclass(cls, base)):
        declared = sorted(base.__abstractmethods__)  # type: ignore[attr-defined]
        lacking = [m for m in declared if not isinstance(cls, type) or m not in dir(cls)]
        detail = f"; it also lacks {', '.join(lacking)}" if lacking else ""
        raise PluginError(f"{what} must be a subclass of {where}{detail}")
    missing = sorted(cls.__abstractmethods__)  # type: ignore[attr-defined]
    gaps = [f"{m} (abstract in {base.__qualname__})" for m in missing]
    if issubclass(cls, (Scheduler, Executor)):
        gaps += cls._capability_gaps()
    if gaps:
        raise PluginError(f"{what} does not implement {where}: missing {'; '.join(gaps)}")
