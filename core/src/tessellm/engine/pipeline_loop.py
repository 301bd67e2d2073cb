"""The engine loop with several steps in flight (pipeline parallelism).

An executor whose ``max_concurrent_batches`` is above 1 (one step per pipeline stage)
gets this loop instead of the serial or overlapped one. It keeps up to that many plans
launched: each is ``advance``d right after its launch (the schedule-ahead seam: the
scheduler counts it as computed and gives each sampling request a placeholder token), so
the next ``schedule()`` plans from the state after it, and a scheduler that
``supports_concurrent_batches`` leaves the requests whose token is still being computed
out of the next plans. A ``step()`` waits for the oldest plan only, ``fill``s its tokens
in, launches the next plan and builds the outputs while the stages work, then tops the
pipeline up again.

What differs from the serial loop: a plan is counted as computed before its tokens are
back, so when a step raises, the plans behind it are collected and dropped, and every plan
in flight is rewound (``Scheduler.rewind``) before the failed one is recovered as usual
(re-run in parts to find the request to blame); a launch that raises is recovered once the
plans in flight have been collected. A request that a stop string (or an abort) finishes
while a plan of its is in flight loses that plan's token, as under the overlapped loop.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from tessellm.engine import structured_steps as so_steps
from tessellm.engine.step_recovery import apply_result, is_fatal, recover_step
from tessellm.errors import ConfigError
from tessellm.interfaces.engine import PendingResult, SchedulerOutput
from tessellm.outputs import RequestOutput

if TYPE_CHECKING:
    from tessellm.engine.llm_engine import LLMEngine


def check_pipelining(engine: LLMEngine, depth: int) -> None:
    """Refuse, before any step, what cannot run with ``depth`` plans in flight."""
    scheduler = engine.scheduler
    if not scheduler.supports_concurrent_batches:
        raise ConfigError(
            f"scheduler {type(scheduler).__name__} does not support several plans in flight "
            f"(supports_concurrent_batches), which the executor's {depth} pipeline stages need"
        )
    if engine.args.speculative_config is not None:
        raise ConfigError(
            "speculative decoding does not run with pipeline parallelism yet; leave "
            "speculative_config unset or use pipeline_parallel_size=1"
        )


class PipelineLoop:
    """``LLMEngine.step`` for an executor with ``max_concurrent_batches`` > 1."""

    def __init__(self, engine: LLMEngine, depth: int) -> None:
        self.engine = engine
        self.depth = depth
        self.in_flight: deque[tuple[SchedulerOutput, PendingResult]] = deque()
        # A plan whose launch raised: recovered (re-run in parts) once nothing is in flight.
        self.failed_launch: tuple[SchedulerOutput, Exception] | None = None

    def step(self) -> list[RequestOutput]:
        engine = self.engine
        idle = not self.in_flight and not engine.scheduler.has_unfinished()
        admitted = so_steps.admit_parked(engine, idle)
        self._top_up()
        if not self.in_flight:
            return admitted + self._recover_failed_launch()
        plan, pending = self.in_flight.popleft()
        try:
            result = pending.result()
        except Exception as exc:
            if is_fatal(exc):
                raise
            return admitted + self._recover(plan, exc)
        changed, failed = apply_result(engine, plan, result, True)
        # Before the next launch: its bitmasks depend on this step's tokens.
        admitted += failed + so_steps.advance_matchers(engine, changed)
        # The first stage starts on the next plan while this one's outputs are built; it
        # is advanced only after them, since they read tokens it would add a placeholder
        # to (no plan is scheduled in between).
        early = self._launch_next()
        outputs = engine.step_outputs(plan, result, changed, admitted)
        if early is not None:
            engine.scheduler.advance(early)
        self._top_up()
        return outputs

    def _top_up(self) -> None:
        """Launch plans until ``depth`` are in flight or nothing more can be scheduled."""
        while (plan := self._launch_next()) is not None:
            self.engine.scheduler.advance(plan)

    def _launch_next(self) -> SchedulerOutput | None:
        """Schedule and launch one more plan, if there is room and work; the caller
        ``advance``s it before anything else is scheduled."""
        engine = self.engine
        scheduler = engine.scheduler
        if (
            self.failed_launch is not None
            or len(self.in_flight) >= self.depth
            or not scheduler.has_unfinished()
        ):
            return None
        plan = scheduler.schedule()
        if plan.empty:
            return None
        try:
            pending = engine._launch(plan)
        except Exception as exc:
            if is_fatal(exc):
                raise
            self.failed_launch = (plan, exc)
            return None
        self.in_flight.append((plan, pending))
        return plan

    def _recover(self, failed: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """``failed`` raised on some stage (every stage left it: the status header passed
        the failure on). The plans behind it are collected and their results dropped (a
        later chunk of a request may have read KV that ``failed`` never wrote); every one
        of them is rewound, latest first, so its requests compute those tokens again; then
        ``failed`` is recovered as the serial loop recovers a step (re-run in parts to find
        the request to blame; the others restart)."""
        later = []
        while self.in_flight:
            plan, pending = self.in_flight.popleft()
            later.append(plan)
            try:
                pending.result()
            except Exception as again:
                if is_fatal(again):
                    raise
        scheduler = self.engine.scheduler
        for plan in reversed([failed, *later]):
            scheduler.rewind(plan)
        return recover_step(self.engine, failed, None, exc)

    def _recover_failed_launch(self) -> list[RequestOutput]:
        if self.failed_launch is None:
            return []
        plan, exc = self.failed_launch
        self.failed_launch = None
        return recover_step(self.engine, plan, None, exc)

    def clear(self) -> None:
        self.in_flight.clear()
        self.failed_launch = None
