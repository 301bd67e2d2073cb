"""The Ray executor: one Ray actor per tensor-parallel rank, placed by a placement group.

The actors run the same :class:`~tessellm.executors.worker.Worker` as the ``mp`` executor,
so ranks may live on several machines of a Ray cluster. The driver connects to the cluster
named by ``RAY_ADDRESS`` (or one started with ``ray start`` on this machine), or starts a
private local one that it shuts down again. Each call waits for every rank with a deadline;
an actor that dies or fails outside a step stops all of them (a step that raised comes back
as a ``RaisedInStep``: ``executors/base.py`` says when that is not fatal).
"""

from __future__ import annotations

import os
import time
from typing import Any

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError
from tessellm.executors.base import DistributedExecutor, deadline_after_raise
from tessellm.executors.worker import (
    EXECUTE_TIMEOUT_ENV,
    STARTUP_TIMEOUT_ENV,
    RaisedInStep,
    Worker,
    WorkerConfig,
    execute_timeout,
    free_port,
    startup_timeout,
)
from tessellm.model_loader import ResolvedModel

CPUS_PER_WORKER_ENV = "TESSELLM_RAY_CPUS_PER_WORKER"
GPU_DEVICES = ("cuda", "rocm")
CLOSE_GRACE_S = 5.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "the ray executor needs Ray: pip install 'tessellm[ray]' (or `pip install ray`)"
        ) from exc
    return ray


class RayWorker:
    """The actor: a ``Worker`` created once the rendezvous address is known."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def rendezvous_address(self) -> tuple[str, int, str]:
        """(this node's IP, a free port on it, this node's Ray id)."""
        ray = _import_ray()
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip), ray.get_runtime_context().get_node_id()

    def start(self, config: WorkerConfig) -> dict[str, Any]:
        self.worker = Worker(config)
        return self.worker.ready_info()

    def call(self, method: str, *args: Any) -> Any:
        assert self.worker is not None, "start() first"
        return getattr(self.worker, method)(*args)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _wants_gpus(ray: Any, device: str) -> bool:
    if device in GPU_DEVICES:
        return True
    # The driver may run on a machine without GPUs; the cluster decides for "auto".
    return device == "auto" and ray.cluster_resources().get("GPU", 0) > 0


class RayExecutor(DistributedExecutor):
    name = "ray"

    def _start(self, args: EngineArgs, resolved: ResolvedModel) -> list[dict[str, Any]]:
        ray = self._ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._actors: list[Any] = []
        self._placement_group: Any = None
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
        world = self.world_size
        gpus = _wants_gpus(ray, args.device)
        cpus = 0.0 if gpus else float(os.environ.get(CPUS_PER_WORKER_ENV) or 1)
        bundle = {"GPU": 1.0} if gpus else {"CPU": cpus}
        try:
            self._placement_group = placement_group([bundle] * world, strategy="PACK")
            ready, _ = ray.wait([self._placement_group.ready()], timeout=startup_timeout())
            if not ready:
                self._fail(
                    f"the Ray cluster cannot place {world} workers of {bundle} each "
                    f"(it has {ray.available_resources()} free); start more nodes or lower "
                    "tensor_parallel_size"
                )
            env = {k: v for k, v in os.environ.items() if k.startswith("TESSELLM_")}
            actor_cls = ray.remote(RayWorker)
            for rank in range(world):
                strategy = PlacementGroupSchedulingStrategy(
                    self._placement_group, placement_group_bundle_index=rank
                )
                options: dict[str, Any] = {
                    "num_cpus": cpus,
                    "num_gpus": 1 if gpus else 0,
                    "scheduling_strategy": strategy,
                }
                if env:
                    options["runtime_env"] = {"env_vars": env}
                self._actors.append(actor_cls.options(**options).remote())
            addresses = self._gather(
                [a.rendezvous_address.remote() for a in self._actors],
                "placement",
                startup_timeout(),
                STARTUP_TIMEOUT_ENV,
            )
            ip, port, _ = addresses[0]
            nodes = [node for _, _, node in addresses]
            configs = [
                WorkerConfig(
                    args,
                    resolved,
                    rank=rank,
                    world_size=world,
                    init_method=f"tcp://{ip}:{port}",
                    # Ray shows each GPU actor only its own GPU, as device 0.
                    local_rank=0 if gpus else nodes[:rank].count(nodes[rank]),
                    local_world_size=nodes.count(nodes[rank]),
                    collective_timeout_s=execute_timeout(),
                )
                for rank in range(world)
            ]
            refs = [a.start.remote(c) for a, c in zip(self._actors, configs, strict=True)]
            return self._gather(refs, "start-up", startup_timeout(), STARTUP_TIMEOUT_ENV)
        except BaseException:
            self._stop_workers()
            raise

    def _call_all(self, method: str, args: tuple[Any, ...], timeout: float) -> list[Any]:
        refs = [actor.call.remote(method, *args) for actor in self._actors]
        return self._gather(refs, method, timeout, EXECUTE_TIMEOUT_ENV)

    def _gather(self, refs: list[Any], what: str, timeout: float, timeout_env: str) -> list[Any]:
        """Every rank's result, or ``_fail`` on the first error, death or the deadline."""
        ray = self._ray
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        started = time.monotonic()
        deadline = started + timeout
        raised: RaisedInStep | None = None
        while pending:
            remaining = deadline - time.monotonic()
            ready, still = (
                ray.wait(pending, num_returns=1, timeout=remaining) if remaining > 0 else ([], [])
            )
            if not ready:
                late = sorted(rank_of[r] for r in pending)
                if raised is not None:
                    self._fail_out_of_step(raised, late, what)
                late = late or "all"
                self._fail(
                    f"Ray worker rank(s) {late} did not finish {what} within {timeout:.0f} s "
                    f"(raise {timeout_env} if that is expected)"
                )
            pending = still
            for ref in ready:
                rank = rank_of[ref]
                try:
                    results[rank] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._fail(
                        f"Ray worker rank {rank} died during {what}; all {self.world_size} "
                        f"workers were stopped ({exc})"
                    )
                except ray.exceptions.RayError as exc:
                    self._fail(f"Ray worker rank {rank} raised in {what}:\n{exc}")
                if raised is None and isinstance(results[rank], RaisedInStep):
                    raised = results[rank]
                    deadline = deadline_after_raise(started, deadline)
        return results

    def _stop_workers(self) -> None:
        ray = self._ray
        actors, self._actors = self._actors, []
        if actors and self._failure is None:
            # Leave the process group politely; whoever does not answer in time is killed.
            closing = [a.close.remote() for a in actors]
            ray.wait(closing, num_returns=len(closing), timeout=CLOSE_GRACE_S)
        for actor in actors:
            ray.kill(actor)
        if self._placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._placement_group)
            self._placement_group = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
