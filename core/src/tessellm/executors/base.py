"""What the multi-process and Ray executors share: the engine-facing calls and failure state.

A subclass says how to start one worker per rank, how to call a method on all of them and
wait (bounded) for every reply, and how to stop them all. A failure (a worker died, raised
outside a step or from a collective, or did not answer in time) stops every worker and
raises ``WorkerError``; later calls raise it again at once, so the engine never waits on
workers that are gone.

A step that raises an ordinary exception on some rank is not such a failure when every rank
leaves the step: each rank runs the same plan, and a collective completes on a rank only
once every rank has entered it, so ranks that all returned ran the same collectives and the
group is still in step. ``execute`` then raises the rank's exception (its own type, rebuilt)
and the workers serve the next call: the engine blames the request(s) that caused it (it
re-runs parts of the plan on all ranks). Sampling runs on every rank, after the last
collective, from the same gathered logits, so a sampler failure reaches every rank or leaves
the others finishing normally. But a rank that raised before a collective leaves the others
waiting in it: ranks that have not answered ``RAISED_RANK_GRACE_S`` (or twice the step's
time so far) after one raised are presumed stuck there, and that is a ``WorkerError``.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any, ClassVar, NoReturn

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.errors import ConfigError, WorkerError
from tessellm.executors.worker import RaisedInStep, execute_timeout
from tessellm.interfaces.engine import Executor, PendingResult, SchedulerOutput, StepResult
from tessellm.model_loader import ResolvedModel
from tessellm.plugins import PluginSet

logger = logging.getLogger(__name__)

# Once a rank has raised in a step, how long the other ranks get to leave the step too
# (at least: twice the time the step had taken when it raised, if longer).
RAISED_RANK_GRACE_S = 5.0


def deadline_after_raise(started: float, deadline: float) -> float:
    """The deadline of a call started at ``started`` (monotonic) once a rank raised now."""
    now = time.monotonic()
    return min(deadline, now + max(RAISED_RANK_GRACE_S, 2 * (now - started)))


def check_tensor_parallel_fit(config: Any, tp: int) -> None:
    """Raise ``ConfigError`` unless the model's heads split evenly over ``tp`` ranks."""
    cfg = ml.text_config(config)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    problems = []
    if heads % tp:
        problems.append(f"its {heads} attention heads do not divide evenly")
    if kv_heads % tp and tp % kv_heads:
        problems.append(
            f"its {kv_heads} KV heads neither divide evenly nor replicate evenly "
            "(the size must divide or be a multiple of the KV head count)"
        )
    if problems:
        raise ConfigError(
            f"this model cannot be split over tensor_parallel_size={tp}: " + "; ".join(problems)
        )


class DistributedExecutor(Executor):
    """One worker per tensor-parallel rank; ``execute`` waits for every rank (not
    ``asynchronous``: the default ``launch`` runs ``execute``)."""

    name: ClassVar[str]
    verifies_drafts = True  # every rank's ModelRunner verifies speculative drafts
    supports_sleep = True

    def __init__(self, args: EngineArgs, resolved: ResolvedModel, plugins: PluginSet) -> None:
        from tessellm.executors import pipeline

        self.args = args
        tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
        self.world_size = tp * pp
        # Pipeline stages each work on a different step (tessellm.executors.pipeline).
        self.max_concurrent_batches = pp
        self._result_rank = pipeline.result_rank(tp, pp)
        self._in_flight = pipeline.StepsInFlight(self)
        self._failure: str | None = None
        self._closed = False
        # Refuse a split that cannot work here, before any process starts.
        config = ml.weight_format(plugins, resolved).load_config(resolved.path)
        check_tensor_parallel_fit(config, tp)
        pipeline.check_pipeline_config(config, args, plugins)
        if args.enable_expert_parallel:
            from tessellm.layers.moe import check_expert_parallel_fit

            check_expert_parallel_fit(config, tp)
        infos = self._start(args, resolved)
        self.worker_pids: list[int] = [info["pid"] for info in infos]
        self._max_model_len: int = infos[0]["max_model_len"]
        self._describe: dict[str, str] = dict(infos[0]["describe"])

    # -- what a subclass provides ------------------------------------------------------------
    @abstractmethod
    def _start(self, args: EngineArgs, resolved: ResolvedModel) -> list[dict[str, Any]]:
        """Start every rank and return each one's ``Worker.ready_info()``, in rank order.
        On failure, stop whatever started and raise (``_fail`` does both)."""

    @abstractmethod
    def _call_all(self, method: str, args: tuple[Any, ...], timeout: float) -> list[Any]:
        """Call ``Worker.<method>(*args)`` on every rank; return the results in rank order.
        Any failure must end in ``_fail``."""

    @abstractmethod
    def _stop_workers(self) -> None:
        """Stop every worker (gently if it still listens, by force otherwise). Idempotent."""

    # -- shared ------------------------------------------------------------------------------
    def _fail(self, message: str) -> NoReturn:
        self._failure = message
        logger.error("%s executor failed: %s", self.name, message)
        self._stop_workers()
        raise WorkerError(message)

    def _fail_out_of_step(self, raised: RaisedInStep, late: list[int], what: str) -> NoReturn:
        self._fail(
            f"worker rank {raised.rank} raised in {what} ({raised.type_name}: "
            f"{raised.message}) and rank(s) {late} did not finish it: they are presumably "
            "waiting in a collective for it, so the ranks are out of step; all "
            f"{self.world_size} workers were stopped.\n{raised.traceback}"
        )

    def _post_all(self, method: str, args: tuple[Any, ...]) -> None:
        """Pipelining: send ``Worker.<method>(*args)`` to every rank without waiting."""
        raise NotImplementedError(f"{type(self).__name__} cannot pipeline steps")

    def _collect_posted(self, method: str) -> list[Any]:
        """Pipelining: every rank's reply to the oldest call ``_post_all`` sent."""
        raise NotImplementedError(f"{type(self).__name__} cannot pipeline steps")

    def _run(self, method: str, *args: Any) -> list[Any]:
        if self._in_flight.busy:
            raise RuntimeError(f"{method} called while pipelined steps are in flight")
        return self._guarded(method, self._call_all, method, args, execute_timeout())

    def _guarded(self, method: str, call: Any, *args: Any) -> Any:
        if self._failure is not None:
            raise WorkerError(f"the workers were stopped after an earlier failure: {self._failure}")
        if self._closed:
            raise WorkerError("the executor has been shut down")
        try:
            return call(*args)
        except WorkerError:
            raise
        except BaseException:
            # Ctrl-C (or anything unexpected) mid-call leaves the ranks out of step with each
            # other: nothing can continue, so stop them all before the exception goes on.
            self._failure = f"interrupted during {method}"
            self._stop_workers()
            raise

    @property
    def failure(self) -> str | None:
        """Why the workers were stopped after a failure (None while they are healthy)."""
        return self._failure

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def describe(self) -> dict[str, str]:
        return {
            **self._describe,
            "executor": self.name,
            "tensor_parallel_size": str(self.args.tensor_parallel_size),
            "pipeline_parallel_size": str(self.args.pipeline_parallel_size),
        }

    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        # Every rank holds the same number of blocks (each its share of the heads).
        return min(self._run("available_blocks", extra_bytes_per_block))

    def initialize_cache(self, num_blocks: int) -> None:
        self._run("initialize_cache", num_blocks)

    def sleep(self, level: int) -> None:
        self._run("sleep", level)

    def wake_up(self) -> None:
        self._run("wake_up")

    def execute(self, plan: SchedulerOutput) -> StepResult:
        return self._step_result(self._run("execute", plan))

    def launch(
        self, plan: SchedulerOutput, previous: tuple[SchedulerOutput, PendingResult] | None = None
    ) -> PendingResult:
        if self.max_concurrent_batches == 1 or previous is not None:
            return super().launch(plan, previous)
        return self._in_flight.launch(plan)

    def _step_result(self, results: list[Any]) -> StepResult:
        # In rank order: under pipelining the earliest stage's exception is the cause.
        for result in results:
            if isinstance(result, RaisedInStep):
                # Every rank left the step: the workers go on; the engine blames a request.
                raise result.exception()
        return results[self._result_rank]

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_workers()
