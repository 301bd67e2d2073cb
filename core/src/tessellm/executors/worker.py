"""What one tensor-parallel rank runs, whichever executor started it (a process or an actor).

A worker joins the torch.distributed group with the platform's backend (gloo on CPU, NCCL
on CUDA), builds its shard of the model through an ordinary ``ModelRunner`` and then does
what the driver asks: report its KV capacity, allocate the cache, run a step's plan.

A step that raises an ordinary exception (a sampler or kernel bug, input no check foresaw)
leaves the worker running: ``execute`` returns a ``RaisedInStep`` instead of a result, and
the driver decides whether the ranks are still in step (see ``executors/base.py``). An
exception from the process group itself (a peer gone, a collective timed out) leaves the
group unusable: it is raised, and ends the worker.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tessellm.config import EngineArgs
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.model_loader import ResolvedModel

# Text of errors raised by the process group's backend (gloo raises a plain RuntimeError
# naming its source file; NCCL's and c10d's name themselves).
_PROCESS_GROUP_MARKERS = ("gloo", "NCCL", "c10d", "ProcessGroup")

STARTUP_TIMEOUT_ENV = "TESSELLM_WORKER_STARTUP_TIMEOUT_SECONDS"
EXECUTE_TIMEOUT_ENV = "TESSELLM_EXECUTE_MODEL_TIMEOUT_SECONDS"


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def startup_timeout() -> float:
    """How long workers may take to join the group and load their shard."""
    return env_seconds(STARTUP_TIMEOUT_ENV, 900.0)


def execute_timeout() -> float:
    """How long one call (a step) may take before the workers are presumed hung."""
    return env_seconds(EXECUTE_TIMEOUT_ENV, 300.0)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def breaks_process_group(exc: BaseException) -> bool:
    """Whether ``exc`` came from a collective (a peer gone, a timeout): the group is then
    out of step or broken, and no later step can run on it."""
    import torch.distributed as dist

    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PROCESS_GROUP_MARKERS)


@dataclass(slots=True)
class RaisedInStep:
    """What a rank returns instead of a step's result when the step raised an ordinary
    exception: the rank is alive, has left the step and waits for the next call."""

    rank: int
    type_name: str
    message: str
    traceback: str
    pickled: bytes | None  # the exception itself, where it pickles

    @classmethod
    def of(cls, exc: Exception, rank: int) -> RaisedInStep:
        try:
            pickled: bytes | None = pickle.dumps(exc)
        except Exception:
            pickled = None
        text = "".join(traceback.format_exception(exc))
        return cls(rank, type(exc).__name__, str(exc), text, pickled)

    def exception(self) -> Exception:
        """The rank's exception as the driver raises it: rebuilt, of its own type where it
        unpickles (so that e.g. an ``InvalidRequestError`` is still one), else a
        ``StepError`` naming the type; the rank's traceback as a note."""
        from tessellm.errors import StepError

        exc: Exception | None = None
        if self.pickled is not None:
            try:
                exc = pickle.loads(self.pickled)
            except Exception:
                exc = None
        if not isinstance(exc, Exception):
            exc = StepError(f"{self.type_name}: {self.message}")
        exc.add_note(f"raised on tensor-parallel rank {self.rank}:\n{self.traceback}")
        return exc


@dataclass(slots=True)
class WorkerConfig:
    """Everything a rank needs to start; plain data, so it crosses process boundaries."""

    args: EngineArgs
    resolved: ResolvedModel
    rank: int
    world_size: int
    init_method: str  # "tcp://host:port" of rank 0's rendezvous
    local_rank: int | None = None  # device index on this machine (None: the rank)
    local_world_size: int = 1  # ranks sharing this machine's CPU cores
    collective_timeout_s: float = 300.0


class Worker:
    """One rank: a model runner over its shard plus the calls the driver makes."""

    def __init__(self, config: WorkerConfig) -> None:
        import torch.distributed as dist

        from tessellm.engine.model_runner import ModelRunner
        from tessellm.interfaces.model import ParallelInfo
        from tessellm.plugins import get_plugins
        from tessellm.selection import choose_platform

        self.rank = config.rank
        plugins = get_plugins()
        platform, _ = choose_platform(plugins, config.args.device)
        parallel = ParallelInfo(
            config.rank,
            config.world_size,
            None,
            config.local_rank,
            expert_parallel=config.args.enable_expert_parallel,
        )
        device = platform.device(parallel.device_index)
        if device.type == "cuda":
            # NCCL binds a communicator to the current device: set it before the group exists.
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend=platform.distributed_backend,
            init_method=config.init_method,
            rank=config.rank,
            world_size=config.world_size,
            timeout=timedelta(seconds=config.collective_timeout_s),
        )
        parallel.group = dist.group.WORLD
        runner_cls = ModelRunner
        # The rank whose tokens the driver takes (each rank of the last stage has them).
        self.reports_result = config.rank == 0
        if config.args.pipeline_parallel_size > 1:
            from tessellm.engine.pipeline_stage import PipelineStageRunner
            from tessellm.executors.pipeline import result_rank, stage_parallel_info

            parallel = stage_parallel_info(config, parallel, plugins)
            runner_cls = PipelineStageRunner
            args = config.args
            tp, pp = args.tensor_parallel_size, args.pipeline_parallel_size
            self.reports_result = config.rank == result_rank(tp, pp)
        self.runner = runner_cls(config.args, config.resolved, parallel=parallel, plugins=plugins)
        if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
            # The platform gave this process every core; the other local ranks need theirs.
            share = torch.get_num_threads() // max(1, config.local_world_size)
            torch.set_num_threads(max(1, share))

    def ready_info(self) -> dict[str, Any]:
        from tessellm.executors.uniproc import describe_runner

        return {
            "pid": os.getpid(),
            "max_model_len": self.runner.max_model_len,
            "describe": describe_runner(self.runner),
        }

    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        return self.runner.available_blocks(extra_bytes_per_block)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def sleep(self, level: int) -> None:
        self.runner.sleep(level)

    def wake_up(self) -> None:
        self.runner.wake_up()

    def execute(self, plan: SchedulerOutput) -> StepResult | RaisedInStep | None:
        try:
            result = self.runner.execute(plan)
        except Exception as exc:
            if breaks_process_group(exc):
                raise
            return RaisedInStep.of(exc, self.rank)
        # Every rank samples the same tokens from the same gathered logits; one copy is enough.
        return result if self.reports_result else None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
