"""What one tensor-parallel rank runs, whichever executor started it (a process or an actor).

A worker joins the torch.distributed group with the platform's backend (gloo on CPU, NCCL
on CUDA), builds its shard of the model through an ordinary ``ModelRunner`` and then does
what the driver asks: report its KV capacity, allocate the cache, run a step's plan.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tessellm.config import EngineArgs
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.model_loader import ResolvedModel

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
        parallel = ParallelInfo(config.rank, config.world_size, None, config.local_rank)
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
        self.runner = ModelRunner(config.args, config.resolved, parallel=parallel, plugins=plugins)
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

    def available_blocks(self) -> int:
        return self.runner.available_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def execute(self, plan: SchedulerOutput) -> StepResult | None:
        result = self.runner.execute(plan)
        # Every rank samples the same tokens from the same gathered logits; one copy is enough.
        return result if self.rank == 0 else None

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
