"""Pipeline parallelism in the distributed executors: stage groups, and steps in flight.

With ``pipeline_parallel_size`` = pp and ``tensor_parallel_size`` = tp the executor starts
tp * pp workers. Each joins the world group, then every worker creates the pp
tensor-parallel groups (``new_group`` is collective over the world: all ranks create all
groups, in the same order) and keeps its own stage's; stages talk to each other
point-to-point over the world group (``tessellm.engine.pipeline_stage``).

The driver sends each step's plan to every rank and may send the next plans before the
first one's tokens are back: up to pp steps are in flight (``max_concurrent_batches``),
each stage working on a different one. Replies come back over each rank's channel in the
order the plans were sent, so steps are collected strictly in launch order; the last
stage's first tensor-parallel rank returns the sampled tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.errors import ConfigError, WorkerError
from tessellm.interfaces.engine import StepResult
from tessellm.interfaces.model import ParallelInfo
from tessellm.interfaces.pipeline import PipelineStage, check_pipeline_fit
from tessellm.interfaces.schedule import SchedulerOutput

if TYPE_CHECKING:
    from tessellm.executors.base import DistributedExecutor
    from tessellm.executors.worker import WorkerConfig
    from tessellm.plugins import PluginSet


def num_layers_of(config: Any) -> int:
    return int(ml.text_config(config).num_hidden_layers)


def check_pipeline_config(config: Any, args: EngineArgs, plugins: PluginSet) -> None:
    """Before any process starts: every stage must get a layer, and what stages cannot
    run yet is refused."""
    from tessellm.engine.cache_layout import layout_for

    pp = args.pipeline_parallel_size
    check_pipeline_fit(num_layers_of(config), pp)
    if pp == 1:
        return
    if args.speculative_config is not None:
        raise ConfigError(
            "speculative decoding does not run with pipeline parallelism yet; leave "
            "speculative_config unset or use pipeline_parallel_size=1"
        )
    if not layout_for(plugins, config, args).plain:
        raise ConfigError(
            "pipeline parallelism does not support models whose KV cache has several "
            "groups, windowed blocks or recurrent state yet; use pipeline_parallel_size=1"
        )


def result_rank(tp: int, pp: int) -> int:
    """The rank whose reply carries a step's tokens: the last stage's first TP rank."""
    return (pp - 1) * tp


def stage_parallel_info(
    config: WorkerConfig, parallel: ParallelInfo, plugins: PluginSet
) -> ParallelInfo:
    """This worker's position once the world group exists: its stage, its tensor-parallel
    rank and group within the stage, and the device it was given."""
    import torch.distributed as dist

    args = config.args
    tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
    model_config = ml.weight_format(plugins, config.resolved).load_config(config.resolved.path)
    groups = (
        [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)] if tp > 1 else []
    )
    stage, tp_rank = divmod(config.rank, tp)
    return ParallelInfo(
        tp_rank,
        tp,
        groups[stage] if groups else None,
        parallel.device_index,
        expert_parallel=parallel.expert_parallel,
        pipeline=PipelineStage.of(config.rank, tp, pp, num_layers_of(model_config)),
    )


class PipelinedStep:
    """A launched step of a pipelined executor; ``result()`` waits for its reply."""

    __slots__ = ("_flight", "_number", "_result")

    def __init__(self, flight: StepsInFlight, number: int) -> None:
        self._flight = flight
        self._number = number
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        if self._result is None:
            self._result = self._flight.collect(self._number)
        return self._result


class StepsInFlight:
    """The steps a pipelined executor has sent and not yet collected."""

    def __init__(self, executor: DistributedExecutor) -> None:
        self.executor = executor
        self.launched = 0
        self.collected = 0

    @property
    def busy(self) -> bool:
        return self.launched != self.collected

    def launch(self, plan: SchedulerOutput) -> PipelinedStep:
        self.executor._guarded("execute", self.executor._post_all, "execute", (plan,))
        self.launched += 1
        return PipelinedStep(self, self.launched)

    def collect(self, number: int) -> StepResult:
        if number != self.collected + 1:
            raise RuntimeError(
                f"pipelined step {number} collected before step {self.collected + 1}: "
                "steps must be collected in the order they were launched"
            )
        executor = self.executor
        try:
            results = executor._guarded("execute", executor._collect_posted, "execute")
        except WorkerError:
            self.collected = self.launched  # the workers are gone; nothing more will come
            raise
        self.collected += 1
        return executor._step_result(results)
