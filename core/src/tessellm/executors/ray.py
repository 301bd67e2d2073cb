"""The Ray executor: one Ray actor per tensor-parallel rank, placed by a placement group.

The actors run the same :class:`~tessellm.executors.worker.Worker` as the ``mp`` executor,
so ranks may live on several machines of a Ray cluster. The driver connects to the cluster
named by ``RAY_ADDRESS`` (or one started with ``ray start`` on this machine), or starts a
private local one that it shuts down again. Each call waits for every rank with a deadline;
an actor that dies or fails outside a step stops all of them (a step that raised comes back
as a ``RaisedInStep``: ``executors/base.py`` says when that is not fatal).

Placement: one bundle per rank, ``PACK``ed onto as few nodes as fit unless
``TESSELLM_RAY_PLACEMENT`` says otherwise (vLLM always packs and has no name for this);
``TESSELLM_RAY_BUNDLE_RESOURCES`` adds custom resources to the bundles, to pin ranks to
nodes. Rank 0's node IP (Ray's address for that node, not 127.0.0.1) is the rendezvous
address, and each rank's gloo traffic goes over the interface that holds its own node's
IP unless ``GLOO_SOCKET_IFNAME`` is set: gloo's own choice (the host name's address) is
often a loopback address that other machines cannot reach.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import time
from collections import deque
from typing import Any, NoReturn

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError
from tessellm.executors.base import DistributedExecutor, deadline_after_raise
from tessellm.executors.worker import (
    EXECUTE_TIMEOUT_ENV,
    STARTUP_TIMEOUT_ENV,
    RaisedInStep,
    Worker,
    WorkerConfig,
    breaks_process_group,
    execute_timeout,
    free_port,
    startup_timeout,
)
from tessellm.model_loader import ResolvedModel

CPUS_PER_WORKER_ENV = "TESSELLM_RAY_CPUS_PER_WORKER"
PLACEMENT_ENV = "TESSELLM_RAY_PLACEMENT"
BUNDLE_RESOURCES_ENV = "TESSELLM_RAY_BUNDLE_RESOURCES"
PLACEMENT_STRATEGIES = {
    "pack": "PACK",
    "spread": "SPREAD",
    "strict_pack": "STRICT_PACK",
    "strict_spread": "STRICT_SPREAD",
}
GPU_DEVICES = ("cuda", "rocm")
CLOSE_GRACE_S = 5.0
# Once a rank lost its peers in a collective, how long the others' calls get to come back
# as dead actors, so that the error names the rank (and node) that went away.
PEER_DEATH_NOTICE_S = 5.0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            "the ray executor needs Ray: pip install 'tessellm[ray]' (or `pip install ray`)"
        ) from exc
    return ray


def placement_strategy() -> str:
    """Ray's name of the strategy ``TESSELLM_RAY_PLACEMENT`` asks for (default ``PACK``)."""
    raw = (os.environ.get(PLACEMENT_ENV) or "pack").strip().lower()
    if raw not in PLACEMENT_STRATEGIES:
        raise ConfigError(
            f"{PLACEMENT_ENV}={raw!r} is not a placement strategy; use one of "
            + ", ".join(PLACEMENT_STRATEGIES)
        )
    return PLACEMENT_STRATEGIES[raw]


def bundle_resources(world_size: int) -> list[dict[str, float]]:
    """Extra resources per rank's bundle from ``TESSELLM_RAY_BUNDLE_RESOURCES``: a JSON
    object (added to every bundle) or a list of objects, one per rank."""
    raw = os.environ.get(BUNDLE_RESOURCES_ENV)
    if not raw:
        return [{} for _ in range(world_size)]
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{BUNDLE_RESOURCES_ENV} is not JSON: {exc}") from exc
    per_rank = parsed if isinstance(parsed, list) else [parsed] * world_size
    if len(per_rank) != world_size:
        raise ConfigError(
            f"{BUNDLE_RESOURCES_ENV} lists {len(per_rank)} bundles for {world_size} ranks"
        )
    bundles = []
    for extra in per_rank:
        if not isinstance(extra, dict) or not all(
            isinstance(k, str) and isinstance(v, int | float) and v > 0 for k, v in extra.items()
        ):
            raise ConfigError(
                f"{BUNDLE_RESOURCES_ENV}: each bundle must be an object of resource name to a "
                f'positive amount, e.g. {{"node_a": 1}}; got {extra!r}'
            )
        bundles.append({k: float(v) for k, v in extra.items()})
    return bundles


def interface_holding(ip: str) -> str | None:
    """The name of the network interface whose IPv4 network contains ``ip``, if any."""
    try:  # Ray ships psutil (ray/thirdparty_files, on sys.path once ray is imported)
        import psutil
    except ImportError:
        return None
    address = ipaddress.ip_address(ip)
    for name, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family != socket.AF_INET or not addr.netmask:
                continue
            network = ipaddress.ip_network(f"{addr.address}/{addr.netmask}", strict=False)
            if address in network:
                return name
    return None


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
        if not os.environ.get("GLOO_SOCKET_IFNAME"):
            # The interface Ray reaches this node on is one the other nodes can reach.
            interface = interface_holding(_import_ray().util.get_node_ip_address())
            if interface is not None:
                os.environ["GLOO_SOCKET_IFNAME"] = interface
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


def _cause(exc: BaseException) -> BaseException:
    """The exception a Ray task raised (Ray wraps it in a ``RayTaskError``)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayExecutor(DistributedExecutor):
    name = "ray"

    def _start(self, args: EngineArgs, resolved: ResolvedModel) -> list[dict[str, Any]]:
        strategy_name = placement_strategy()
        extras = bundle_resources(self.world_size)
        ray = self._ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._actors: list[Any] = []
        self._posted: deque[list[Any]] = deque()  # pipelined steps sent, not yet collected
        self._placement_group: Any = None
        # Where each rank runs: Ray node ids and IPs, in rank order (filled once placed).
        self.worker_nodes: list[str] = []
        self.worker_ips: list[str] = []
        self.init_method = ""
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            # None: RAY_ADDRESS, else the cluster `ray start` left on this machine, else a
            # private one. ("auto" would also take any Ray instance found running here.)
            ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
        world = self.world_size
        gpus = _wants_gpus(ray, args.device)
        cpus = 0.0 if gpus else float(os.environ.get(CPUS_PER_WORKER_ENV) or 1)
        base = {"GPU": 1.0} if gpus else {"CPU": cpus}
        bundles = [{**base, **extra} for extra in extras]
        try:
            self._placement_group = placement_group(bundles, strategy=strategy_name)
            ready, _ = ray.wait([self._placement_group.ready()], timeout=startup_timeout())
            if not ready:
                self._fail(
                    f"the Ray cluster cannot place {world} workers as {bundles} with strategy "
                    f"{strategy_name} (it has {ray.available_resources()} free); start more "
                    f"nodes, lower tensor_parallel_size or change {PLACEMENT_ENV}"
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
            self.worker_ips = [ip for ip, _, _ in addresses]
            self.worker_nodes = nodes = [node for _, _, node in addresses]
            ip, port, _ = addresses[0]
            self.init_method = f"tcp://{ip}:{port}"
            configs = [
                WorkerConfig(
                    args,
                    resolved,
                    rank=rank,
                    world_size=world,
                    init_method=self.init_method,
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

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "ray_nodes": str(len(set(self.worker_nodes)))}

    def _call_all(self, method: str, args: tuple[Any, ...], timeout: float) -> list[Any]:
        refs = [actor.call.remote(method, *args) for actor in self._actors]
        return self._gather(refs, method, timeout, EXECUTE_TIMEOUT_ENV)

    def _post_all(self, method: str, args: tuple[Any, ...]) -> None:
        # An actor runs one call at a time, in the order one caller submitted them.
        self._posted.append([actor.call.remote(method, *args) for actor in self._actors])

    def _collect_posted(self, method: str) -> list[Any]:
        refs = self._posted.popleft()
        return self._gather(refs, method, execute_timeout(), EXECUTE_TIMEOUT_ENV)

    def _where(self, rank: int) -> str:
        if rank < len(self.worker_ips):
            return f"rank {rank} (node {self.worker_ips[rank]}, {self.worker_nodes[rank][:12]})"
        return f"rank {rank}"

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
                    self._fail_dead(rank, what, exc)
                except ray.exceptions.RayError as exc:
                    if breaks_process_group(_cause(exc)):
                        self._fail_lost_peers(rank, exc, pending, rank_of, what)
                    self._fail(f"Ray worker {self._where(rank)} raised in {what}:\n{exc}")
                if raised is None and isinstance(results[rank], RaisedInStep):
                    raised = results[rank]
                    deadline = deadline_after_raise(started, deadline)
        return results

    def _fail_dead(self, rank: int, what: str, exc: BaseException, seen_by: str = "") -> NoReturn:
        self._fail(
            f"Ray worker {self._where(rank)} died during {what} (its process or node is "
            f"gone){seen_by}; all {self.world_size} workers were stopped ({exc})"
        )

    def _fail_lost_peers(
        self, rank: int, exc: BaseException, pending: list[Any], rank_of: dict[Any, int], what: str
    ) -> NoReturn:
        """A rank's collective broke (a peer went away, or timed out): name the peer that
        died if Ray reports it soon, else the ranks that did not answer."""
        ray = self._ray
        seen = f"; {self._where(rank)} lost it in a collective: {_cause(exc)}"
        waiting = list(pending)
        deadline = time.monotonic() + PEER_DEATH_NOTICE_S
        while waiting and time.monotonic() < deadline:
            done, waiting = ray.wait(
                waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            for ref in done:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as death:
                    self._fail_dead(rank_of[ref], what, death, seen)
                except ray.exceptions.RayError:
                    pass  # another rank that lost its peers: keep looking for the dead one
        silent = ", ".join(self._where(rank_of[ref]) for ref in waiting) or "none"
        self._fail(
            f"Ray worker {self._where(rank)} lost its peers in a collective during {what} "
            f"({_cause(exc)}); not answering after {PEER_DEATH_NOTICE_S:.0f} s: {silent} "
            f"(presumably dead or unreachable); all {self.world_size} workers were stopped"
        )

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
