"""The executor seam: what runs one engine step on the model, and the handles a launched step
returns.

Kept apart from ``tessellm.interfaces.engine`` (which re-exports every name here, the path
plugins import from) because the executor is the largest of the three seams and the only one
that talks to devices: its launch, deferred sampling and sleep contracts read best on their
own. The scheduler and KV cache manager seams, and ``check_implementation``, stay there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Protocol

from tessellm.interfaces.schedule import SchedulerOutput, StepResult

if TYPE_CHECKING:
    from tessellm.config import EngineArgs
    from tessellm.model_loader import ResolvedModel
    from tessellm.plugins import PluginSet

__all__ = ["CompletedStep", "DeferredSampling", "Executor", "PendingResult"]


class PendingResult(Protocol):
    """A launched step (``Executor.launch``)."""

    def result(self) -> StepResult:
        """Wait for the step's sampled tokens (and logprobs) and return them."""
        ...


class DeferredSampling(Protocol):
    """A step launched with ``defer_sampling=True`` (``Executor.defers_sampling``): its
    forward pass is queued, its sampling waits for ``sample()``."""

    def sample(self) -> None:
        """Queue the sampling, reading each seq's ``token_bitmask`` now (idempotent). A
        sampling error is raised here, and again by ``result()``."""
        ...

    def result(self) -> StepResult: ...


class CompletedStep:
    """A step that ran in full already: what ``Executor.launch`` returns by default."""

    __slots__ = ("_result",)

    def __init__(self, result: StepResult) -> None:
        self._result = result

    def result(self) -> StepResult:
        """The step's result, at once."""
        return self._result


class Executor(ABC):
    """Owns the model runner(s), in this process or in one process per rank, and runs steps.

    Constructed by the engine as ``cls(args, resolved, plugins)``: the ``EngineArgs``, the
    ``ResolvedModel`` to load, the ``PluginSet``. The constructor loads the model. The
    engine then asks ``available_blocks()``, picks a block count and calls
    ``initialize_cache`` once before the first step.
    """

    asynchronous: bool = False
    """Whether ``launch`` returns before the device is done with the step, so that the engine can
    prepare the next step meanwhile (``LLMEngine.overlap_steps``). May be a property where it
    depends on the device; the engine reads it once, after construction."""

    supports_sleep: bool = False
    """Whether ``sleep(level)`` and ``wake_up()`` are implemented: free the KV cache (and at
    level 1 move the weights to host memory, at level 2 free them) and restore both."""

    verifies_drafts: bool = False
    """Whether a step verifies speculative drafts: for a seq with ``draft_token_ids`` it
    scores every draft and returns ``StepResult.num_accepted_drafts`` (the model runner's
    ``spec_verify`` does it). Without it the engine refuses ``speculative_config``."""

    feeds_sampled_tokens: bool = False
    """Whether ``launch(plan, previous)`` accepts ``previous``: it replaces, on the device, each
    ``PLACEHOLDER_TOKEN`` in ``plan`` (the last token of a seq that sampled in ``previous``) with
    the token ``previous`` sampled. Requires overriding ``launch``."""

    max_concurrent_batches: int = 1
    """How many launched steps may be in flight at once (vLLM's name): above 1 (pipeline
    parallelism, one step per stage) ``launch`` returns at once and the engine keeps up to
    this many steps launched, collecting their results in launch order; the plans in flight
    share no sampling request. May be set per instance; the engine reads it once."""

    defers_sampling: bool = False
    """Whether ``launch(plan, previous, defer_sampling=True)`` queues only the forward pass and
    returns a ``DeferredSampling``: the engine fills the grammar bitmasks of a step scheduled
    ahead once the step before it has its tokens (they decide the bitmasks), while the device
    runs the forward pass. May be a property; read at every launch."""

    def __init__(  # noqa: B027 - states the constructor the engine calls
        self, args: EngineArgs, resolved: ResolvedModel, plugins: PluginSet
    ) -> None:
        """Load the model described by ``resolved`` as ``args`` say."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """The longest sequence (prompt + output tokens) the loaded model takes."""

    @abstractmethod
    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        """How many KV cache blocks (of ``args.block_size`` tokens) fit in the memory left
        after loading the model; the engine allocates at most this many. With
        ``extra_bytes_per_block`` (a speculative proposer's own cache, indexed by the same
        block ids; passed only when nonzero) each block costs that much more."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache: ``num_blocks`` blocks, ids ``range(num_blocks)``."""

    @abstractmethod
    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run one step to the end: compute the plan's tokens (KV written to the blocks in
        each seq's ``block_ids``) and sample one token per seq with ``sample=True``."""

    def launch(
        self, plan: SchedulerOutput, previous: tuple[SchedulerOutput, PendingResult] | None = None
    ) -> PendingResult:
        """Start a step; ``result()`` on what returns waits for its tokens. ``previous`` (the
        step launched before, not yet waited for) is passed only to an executor that
        ``feeds_sampled_tokens``. The default runs ``execute`` to the end."""
        if previous is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not feed sampled tokens (feeds_sampled_tokens)"
            )
        return CompletedStep(self.execute(plan))

    def sleep(self, level: int) -> None:
        """``supports_sleep``: give the device's memory back (level 1 or 2, vLLM's)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")

    def wake_up(self) -> None:
        """``supports_sleep``: restore what ``sleep`` freed (an empty KV cache)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")

    def describe(self) -> dict[str, str]:
        """What this executor runs on, for logs and benchmark reports (e.g. ``platform``,
        ``attention``, ``dtype``, ``device``, ``quantization``)."""
        return {"executor": type(self).__name__}

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the model, the cache and any worker processes. Called once; the default
        does nothing."""

    @classmethod
    def _capability_gaps(cls) -> list[str]:
        gaps = []
        if cls.feeds_sampled_tokens and cls.launch is Executor.launch:
            gaps.append("launch (it sets feeds_sampled_tokens = True)")
        if cls.supports_sleep and (cls.sleep is Executor.sleep or cls.wake_up is Executor.wake_up):
            gaps.append("sleep and wake_up (it sets supports_sleep = True)")
        return gaps
