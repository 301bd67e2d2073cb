"""Fault isolation: a step that raises is traced to the request(s) that caused it.

A request that passed validation can still break a step (a sampler or kernel bug, an
input no check foresaw, parameters changed after the request was added). Rather than
stopping the engine for everyone, ``LLMEngine`` hands the failed plan to
``find_culprits``:

1. re-validate each request of the plan (what a request carries may have changed since it
   was added); requests that fail validation are the culprits, with a 400-type error;
2. otherwise bisect: run halves of the plan again, alone, down to the single requests that
   still fail; a half that succeeds is innocent. A failure that no part reproduces alone
   (two requests that only break together, a transient fault) blames every request of
   the part that failed, as does running out of re-runs.

The culprits finish with an error; every other request of the plan restarts from the KV
its earlier steps wrote (the failed step's writes are discarded, as after a preemption).
Re-running parts of a plan is safe: a step only writes the KV of positions it computes,
in blocks that belong to the plan's own requests, and everything it computed is computed
again after the restart.

Only an error that says the device or a worker is gone (``is_fatal``) is not attributed:
it leaves ``step()`` and stops the engine. With tensor parallelism, a step that raised on a
rank is attributed like any other as long as every rank left the step (the executor raises
the rank's own exception); a rank left waiting in a collective is a ``WorkerError``.

On the host, after the step ran: the scheduler's ``update`` (or ``fill``) says which
request it could not apply the result to (``RequestUpdateError``), and the output
processor which request it could not detokenize (``take_failed``); those fail alone, with
a 400-type error where validation explains it. Still fatal: an exception from
``Scheduler.schedule()`` (it plans from every request at once; one that raised midway has
left blocks allocated and queues half-changed, which no seam can undo, and nothing it reads
from a request is beyond what validation bounds, so a raise there is the scheduler's bug),
and any other exception from ``update``/``fill`` (whose progress was applied is unknown).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from tessellm.errors import InvalidRequestError, StepError, TessellmError, WorkerError
from tessellm.interfaces.engine import (
    PLACEHOLDER_TOKEN,
    Request,
    RequestStatus,
    RequestUpdateError,
    ScheduledSeq,
    SchedulerOutput,
    StepResult,
)
from tessellm.outputs import RequestOutput
from tessellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tessellm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# Text of errors after which the device cannot be trusted (CUDA errors are sticky: every
# later call on the context fails too); an out-of-memory error is not among them.
_DEVICE_LOST_MARKERS = (
    "CUDA error",
    "device-side assert",
    "illegal memory access",
    "CUBLAS_STATUS",
    "CUDNN_STATUS",
    "NCCL error",
    "HIP error",
    "device lost",
)


class RequestFailedError(TessellmError):
    """A request broke a step (an engine bug, or input no check foresaw). It finished with
    this error; other requests are unaffected."""


@dataclass(slots=True)
class FailedRequestOutput(RequestOutput):
    """The final output of a request that failed inside a step: finished, its completions'
    ``finish_reason`` is ``"abort"``, and ``error`` says why (``InvalidRequestError`` for
    input the engine rejects, ``RequestFailedError`` otherwise)."""

    error: Exception | None = None

    @classmethod
    def of(cls, output: RequestOutput, error: Exception) -> FailedRequestOutput:
        values = {f.name: getattr(output, f.name) for f in fields(RequestOutput)}
        return cls(**values, error=error)


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` means the engine cannot go on (no request is to blame): a worker
    process failed, or the device reported an error that poisons every later call."""
    if not isinstance(exc, Exception) or isinstance(exc, WorkerError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    text = str(exc)
    # A StepError is a worker's exception that could not be sent as itself: its text too.
    return isinstance(exc, (RuntimeError, StepError)) and any(
        m in text for m in _DEVICE_LOST_MARKERS
    )


def sub_plan(seqs: list[ScheduledSeq]) -> SchedulerOutput:
    return SchedulerOutput(list(seqs), sum(len(s.token_ids) for s in seqs))


class Bisection:
    """Finds the seqs of a failed plan that fail when run without the others.

    ``run`` executes a plan to its result and raises what the step raised. At most
    ``max_runs`` re-runs: about two per halving for one culprit.
    """

    def __init__(self, run: Callable[[SchedulerOutput], None], num_seqs: int) -> None:
        self.run = run
        self.runs_left = 2 * math.ceil(math.log2(max(2, num_seqs))) + 2

    def culprits(self, seqs: list[ScheduledSeq], error: Exception) -> dict[str, Exception]:
        """``seqs`` failed together with ``error``: the request ids to blame, each with
        the error its part raised."""
        return self._search(seqs, known_error=error)

    def _try(self, seqs: list[ScheduledSeq]) -> Exception | None:
        self.runs_left -= 1
        try:
            self.run(sub_plan(seqs))
        except Exception as exc:
            if is_fatal(exc):
                raise
            return exc
        return None

    def _search(
        self, seqs: list[ScheduledSeq], known_error: Exception | None
    ) -> dict[str, Exception]:
        error = known_error
        if error is None:
            if self.runs_left <= 0:
                return {}  # cannot tell: the caller blames the part it knows failed
            error = self._try(seqs)
            if error is None:
                return {}
        if len(seqs) == 1 or self.runs_left <= 0:
            return {s.request_id: error for s in seqs}
        middle = len(seqs) // 2
        found = self._search(seqs[:middle], None)
        found.update(self._search(seqs[middle:], None))
        # Neither half fails alone (or the budget ran out): blame the part that failed.
        return found or {s.request_id: error for s in seqs}


def find_culprits(
    plan: SchedulerOutput,
    error: Exception,
    validate: Callable[[ScheduledSeq], Exception | None],
    run: Callable[[SchedulerOutput], None] | None,
) -> dict[str, Exception]:
    """The request ids of ``plan`` to fail for ``error``, each with the error to report.

    ``validate(seq)`` re-checks a seq's request (an error, or None when it is fine);
    ``run`` re-runs a part of the plan, or is None where that is not possible (then every
    request of the plan is blamed when validation finds none)."""
    invalid = {s.request_id: e for s in plan.seqs if (e := validate(s)) is not None}
    if invalid:
        return invalid
    if run is None or len(plan.seqs) == 1:
        return dict.fromkeys((s.request_id for s in plan.seqs), error)
    return Bisection(run, len(plan.seqs)).culprits(plan.seqs, error)


def client_error(exc: Exception) -> Exception:
    """What a culprit's client is told: a validation error as is (a 400), anything else as
    a ``RequestFailedError`` naming what was raised."""
    if isinstance(exc, InvalidRequestError):
        return exc
    return RequestFailedError(f"the request failed in the engine: {type(exc).__name__}: {exc}")


def recover_step(
    engine: LLMEngine, plan: SchedulerOutput, previous: Any, error: Exception
) -> list[RequestOutput]:
    """``plan`` raised ``error`` before its result was applied: fail the requests to blame
    (their final outputs, as ``FailedRequestOutput``, are returned) and restart the rest.
    ``previous`` is what ``plan`` was launched with (re-runs feed on it)."""
    seqs = [s for s in plan.seqs if _unfinished(engine, s.request_id)]
    logger.warning(
        "a step of %d request(s) failed (%s: %s); finding the request(s) that caused it",
        len(seqs),
        type(error).__name__,
        error,
    )

    def validate(seq: ScheduledSeq) -> Exception | None:
        return revalidate(engine, seq.request_id, seq.params)

    def run(part: SchedulerOutput) -> None:
        engine.executor.launch(part, previous).result()

    culprits = find_culprits(sub_plan(seqs), error, validate, run) if seqs else {}
    outputs = fail_requests(engine, culprits)
    restart_requests(engine, [s.request_id for s in seqs if _unfinished(engine, s.request_id)])
    return outputs


def revalidate(engine: LLMEngine, request_id: str, params: SamplingParams) -> Exception | None:
    """The ``InvalidRequestError`` this live request's prompt and ``params`` fail (they may
    have been changed since it was added), or None."""
    processor = engine.output_processor
    parent = processor.parents.get(processor.child_to_parent.get(request_id, ""))
    if parent is None:
        return None
    try:
        engine.validate_prompt(parent.prompt_token_ids, params)
    except InvalidRequestError as exc:
        return exc
    return None


def apply_result(
    engine: LLMEngine, plan: SchedulerOutput, result: StepResult, ahead: bool
) -> tuple[list[Request], list[RequestOutput]]:
    """The scheduler's ``update`` (``fill`` when scheduled ahead) of ``plan``'s result:
    the requests that got a token, and the final outputs of those it failed for."""
    apply = engine.scheduler.fill if ahead else engine.scheduler.update
    try:
        return apply(plan, result), []
    except RequestUpdateError as exc:
        return exc.changed, fail_explained(engine, plan, exc.errors)


def fail_unprocessed(engine: LLMEngine, plan: SchedulerOutput) -> list[RequestOutput]:
    """Fail the requests of ``plan`` whose outputs could not be processed (detokenized)."""
    failed = engine.output_processor.take_failed()
    return fail_explained(engine, plan, failed) if failed else []


def fail_explained(
    engine: LLMEngine, plan: SchedulerOutput, errors: dict[str, Exception]
) -> list[RequestOutput]:
    """Fail these requests of ``plan``, each with its validation error where its
    parameters no longer validate (a 400), else with what it raised."""
    params = {s.request_id: s.params for s in plan.seqs}
    explained = {
        rid: revalidate(engine, rid, params[rid]) if rid in params else None for rid in errors
    }
    return fail_requests(engine, {rid: explained[rid] or exc for rid, exc in errors.items()})


def _unfinished(engine: LLMEngine, request_id: str) -> bool:
    processor = engine.output_processor
    parent = processor.parents.get(processor.child_to_parent.get(request_id, ""))
    child = parent.children.get(request_id) if parent is not None else None
    return child is not None and child.completion.finish_reason is None


def fail_requests(engine: LLMEngine, culprits: dict[str, Exception]) -> list[RequestOutput]:
    """Finish the parent request of each culprit (all its samples) with the culprit's error."""
    processor = engine.output_processor
    errors: dict[str, Exception] = {}
    for request_id, exc in culprits.items():
        if (parent_id := processor.child_to_parent.get(request_id)) is not None:
            errors.setdefault(parent_id, client_error(exc))
    return fail_parents(engine, errors)


def fail_parents(engine: LLMEngine, errors: dict[str, Exception]) -> list[RequestOutput]:
    """Finish each parent request (all its samples) with its error: their final outputs."""
    processor = engine.output_processor
    outputs: list[RequestOutput] = []
    for parent_id, exc in errors.items():
        logger.warning("request %s failed: %s", parent_id, exc)
        engine.scheduler.finish_requests(
            processor.child_ids(parent_id), RequestStatus.FINISHED_ABORTED
        )
        final = processor.abort(parent_id)
        if final is not None:
            outputs.append(FailedRequestOutput.of(final, exc))
    return outputs


def restart_requests(engine: LLMEngine, request_ids: list[str]) -> None:
    """Put these requests back in the queue as new ones that keep their output so far: the
    scheduler frees their blocks (the failed step's are withdrawn from the prefix cache,
    unwritten) and they recompute from what the cache still holds, as after a preemption."""
    for old in engine.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
        engine.scheduler.add_request(
            Request(
                old.request_id,
                old.prompt_token_ids,
                old.params,
                eos_token_ids=old.eos_token_ids,
                priority=old.priority,
                arrival_time=old.arrival_time,
                prompt_leader_id=old.prompt_leader_id,
                cache_salt=old.cache_salt,
                lora_request=old.lora_request,
                output_token_ids=[t for t in old.output_token_ids if t != PLACEHOLDER_TOKEN],
                num_cached_tokens=old.num_cached_tokens,
                num_preemptions=old.num_preemptions + 1,
                first_token_time=old.first_token_time,
            )
        )
