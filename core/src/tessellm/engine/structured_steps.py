"""The engine loop's structured-output steps (kept apart so that llm_engine.py stays the
loop and structured_output.py the manager): parking requests while their grammar
compiles, admitting them, advancing matchers after a step, and sampling a step scheduled
ahead once its bitmasks can be filled.

A step scheduled ahead (``LLMEngine.schedule_ahead``) is launched before the tokens of the
step running on the device are known, so its constrained seqs' bitmasks cannot be filled
at launch. With an executor that ``defers_sampling`` it launches the forward pass only;
when the running step's tokens arrive and the matchers have taken them, the bitmasks are
filled and the step samples, while the device still runs its forward pass. Without one, a
step with a constrained sampling seq is not scheduled ahead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessellm.engine import step_recovery
from tessellm.engine.step_recovery import is_fatal
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.request import Request, RequestStatus
from tessellm.interfaces.schedule import SchedulerOutput
from tessellm.outputs import RequestOutput

if TYPE_CHECKING:
    from tessellm.engine.llm_engine import LLMEngine

PARKED_WAIT_S = 0.01  # an idle step waits this long for a compile (not a busy loop)


def schedule_or_park(engine: LLMEngine, parent_id: str, children: list[Request]) -> None:
    """Give a new request's samples to the scheduler, or park them while their grammar
    compiles (a compiled one, cached, starts at once)."""
    constraint = children[0].params.structured_outputs
    manager = engine.structured
    if constraint is None or manager.add(parent_id, children, manager.submit(constraint)):
        for child in children:
            engine.scheduler.add_request(child)


def admit_parked(engine: LLMEngine, idle: bool) -> list[RequestOutput]:
    """Give the scheduler the parked requests whose grammar is ready and fail those whose
    compile failed. ``idle``: nothing else can run, so first wait a little for a compile
    rather than spin."""
    manager = engine.structured
    if not manager.parked:
        return []
    if idle:
        manager.wait(PARKED_WAIT_S)
    start, errors = manager.ready()
    processor = engine.output_processor
    for child in start:
        parent_id = processor.child_to_parent.get(child.request_id)
        if parent_id is None or parent_id in errors:
            continue
        try:
            engine.scheduler.add_request(child)
        except InvalidRequestError as exc:
            errors[parent_id] = exc
    return fail_parents(engine, errors)


def advance_matchers(engine: LLMEngine, changed: list[Request]) -> list[RequestOutput]:
    """After the scheduler took a step's tokens: feed them to the matchers, finish the
    requests whose grammar ended, fail those whose matcher failed (their outputs)."""
    manager = engine.structured
    if not manager.matchers and not manager.failed:
        return []
    ended, failed = manager.accept(changed)
    if ended:
        engine.scheduler.finish_requests(ended, RequestStatus.FINISHED_STOPPED)
    errors: dict[str, Exception] = {}
    for request_id, error in failed.items():
        parent_id = engine.output_processor.child_to_parent.get(request_id)
        if parent_id is not None:
            errors.setdefault(parent_id, error)
    return fail_parents(engine, errors)


def defer_bitmasks(engine: LLMEngine, plan: SchedulerOutput) -> bool:
    """Whether ``plan``, scheduled ahead, must wait for its bitmasks: it has constrained
    sampling seqs and the executor can sample after launching the forward pass."""
    matchers = engine.structured.matchers
    return (
        bool(matchers)
        and bool(engine.executor.defers_sampling)
        and any(seq.sample and seq.request_id in matchers for seq in plan.seqs)
    )


def sample_deferred(engine: LLMEngine) -> None:
    """Once the matchers have this step's tokens: fill the bitmasks of the step scheduled
    ahead and let it sample (its forward pass ran meanwhile)."""
    manager = engine.structured
    if manager.deferred is None:
        return
    (plan, pending, previous), manager.deferred = manager.deferred, None
    manager.fill_bitmasks(plan, scheduled_ahead=True)
    try:
        pending.sample()
    except Exception as exc:
        if is_fatal(exc):
            raise
        # As a launch that raised: recovered (its placeholders from ``previous``) once this
        # step's outputs are out.
        if engine._in_flight is not None and engine._in_flight[1] is pending:
            engine._in_flight = None
        engine._failed_launch = (plan, previous, exc)


def fail_parents(engine: LLMEngine, errors: dict[str, Exception]) -> list[RequestOutput]:
    """Finish each parent request with its error, then drop what it held here."""
    if not errors:
        return []
    outputs = step_recovery.fail_parents(engine, errors)
    engine.structured.sweep(engine.output_processor)
    return outputs
