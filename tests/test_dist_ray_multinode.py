"""The Ray executor on a real two-node Ray cluster started on this machine.

Node A is the head (`ray start --head`), node B a second raylet joined with
`ray start --address` on its own IP (127.0.0.2) and temp dir. Each has one CPU and its own
custom resource, and each rank's bundle asks for one of them, so TP=2 provably spans both
nodes. The cluster is stopped by killing its own processes (what `ray stop --force` does,
but `ray stop` kills every Ray process of the user on the machine, other tests' too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import TEST_PROMPTS

from tessellm import LLM, SamplingParams
from tessellm.errors import ConfigError, WorkerError
from tessellm.executors.ray import bundle_resources, interface_holding, placement_strategy
from tessellm.executors.worker import free_port

# Alone, not beside other tests (the README's command runs these after the parallel
# part): Ray places its actors on a loaded machine late or not at all.
pytestmark = pytest.mark.serial

psutil = pytest.importorskip("psutil")

NODE_B_IP = "127.0.0.2"  # another loopback address: node B's raylet binds its ports there
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Ray >= 2.50 turns token authentication on for a new head; the test cluster runs without
# it (a driver that has token auth on can still talk to it).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
STOP_TIMEOUT_S = 15


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


class TwoNodeCluster:
    def __init__(self) -> None:
        # Short paths: Ray's unix sockets live under the temp dir (108-byte limit).
        self.dirs = [tempfile.mkdtemp(prefix="tlr-a-"), tempfile.mkdtemp(prefix="tlr-b-")]
        self.address = f"127.0.0.1:{free_port()}"
        self.seen: dict[int, psutil.Process] = {}  # every process of the cluster, ever

    def _ray_start(self, temp_dir: str, resource: str, *first: str) -> None:
        ports = [
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
        ]
        cmd = [ray_cli(), "start", *first, "--num-cpus", "1", "--temp-dir", temp_dir]
        cmd += ["--resources", json.dumps({resource: 1}), "--object-store-memory", "80000000"]
        cmd += ["--disable-usage-stats"] + [f"{p}={free_port()}" for p in ports]
        env = {**os.environ, **RAY_ENV}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        self.track()

    def start(self) -> None:
        port = self.address.split(":")[1]
        self._ray_start(
            self.dirs[0], "node_a", "--head", "--port", port, "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
        )  # fmt: skip
        self._ray_start(
            self.dirs[1], "node_b", "--address", self.address, "--node-ip-address", NODE_B_IP
        )

    def track(self) -> list[psutil.Process]:
        """The cluster's live processes: those naming its temp dirs, and their children
        (Ray renames its agents and workers, so those are found as children). Remembered,
        so that processes orphaned by a killed raylet are still found later."""
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(d in arg for arg in proc.info["cmdline"] or () for d in self.dirs):
                roots.append(proc)
        for proc in roots:
            self.seen[proc.pid] = proc
            for child in _children(proc):
                self.seen[child.pid] = child
        return [p for p in self.seen.values() if _alive(p)]

    def raylet(self, temp_dir: str) -> psutil.Process:
        for proc in self.track():
            cmdline = proc.cmdline()
            if cmdline and cmdline[0].endswith("raylet") and any(temp_dir in a for a in cmdline):
                return proc
        raise AssertionError(f"no raylet running from {temp_dir}")

    def stop(self) -> list[psutil.Process]:
        """`ray stop --force` for this cluster only; what is still alive afterwards."""
        procs = self.track()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(procs, timeout=STOP_TIMEOUT_S)
        return self.track()


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(proc: psutil.Process) -> bool:
    try:  # a zombie has exited; only its parent's wait is missing
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    # An earlier test module's engine may have left this process connected to a local Ray
    # (its executor did not own the connection): the cluster's engines must join this one.
    if ray.is_initialized():
        ray.shutdown()
    nodes = TwoNodeCluster()
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        for temp_dir in nodes.dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def on_cluster(cluster, monkeypatch) -> TwoNodeCluster:
    """Engines made in the test join the cluster, rank r on the node of resource r."""
    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("TESSELLM_RAY_PLACEMENT", "spread")
    monkeypatch.setenv("TESSELLM_RAY_BUNDLE_RESOURCES", '[{"node_a": 1}, {"node_b": 1}]')
    return cluster


def ray_llm_args(model: Path) -> dict:
    return dict(
        model=str(model),
        dtype="float32",
        device="cpu",
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
    )


def test_placement_settings_are_checked(monkeypatch):
    monkeypatch.setenv("TESSELLM_RAY_PLACEMENT", "Strict_Spread")
    assert placement_strategy() == "STRICT_SPREAD"
    monkeypatch.setenv("TESSELLM_RAY_PLACEMENT", "scatter")
    with pytest.raises(ConfigError, match="'scatter' is not a placement strategy"):
        placement_strategy()
    monkeypatch.setenv("TESSELLM_RAY_BUNDLE_RESOURCES", '{"fast_net": 0.5}')
    assert bundle_resources(2) == [{"fast_net": 0.5}, {"fast_net": 0.5}]
    monkeypatch.setenv("TESSELLM_RAY_BUNDLE_RESOURCES", '[{"node_a": 1}]')
    with pytest.raises(ConfigError, match="lists 1 bundles for 2 ranks"):
        bundle_resources(2)
    monkeypatch.setenv("TESSELLM_RAY_BUNDLE_RESOURCES", '[{"node_a": 1}, {"node_b": "x"}]')
    with pytest.raises(ConfigError, match="positive amount"):
        bundle_resources(2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="127.0.0.0/8 on lo is Linux's")
def test_gloo_interface_is_the_one_holding_the_node_ip():
    loopback = interface_holding("127.0.0.1")
    assert loopback is not None
    assert interface_holding(NODE_B_IP) == loopback  # the whole 127.0.0.0/8 network
    assert interface_holding("203.0.113.7") is None  # TEST-NET-3: on no interface here


@pytest.mark.slow
def test_tp2_across_two_nodes_matches_one_process(on_cluster, tiny_llama):
    import ray

    single = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    expected = [o.outputs[0].token_ids for o in single.generate(TEST_PROMPTS, GREEDY)]
    llm = LLM(**ray_llm_args(tiny_llama))
    executor = llm.engine.executor
    try:
        assert llm.engine.describe()["ray_nodes"] == "2"
        nodes, ips = executor.worker_nodes, executor.worker_ips
        assert nodes[0] != nodes[1]  # as the workers reported them
        resources = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert "node_a" in resources[nodes[0]] and "node_b" in resources[nodes[1]]
        # Rank 0's node IP is the rendezvous address; rank 1 is on node B's own IP.
        assert executor.init_method.startswith(f"tcp://{ips[0]}:")
        assert ips[1] == NODE_B_IP != ips[0]
        got = [o.outputs[0].token_ids for o in llm.generate(TEST_PROMPTS, GREEDY)]
        assert got == expected
        workers = [psutil.Process(pid) for pid in executor.worker_pids]
    finally:
        llm.engine.shutdown()
    assert not ray.is_initialized()  # the executor connected, so it disconnected
    _, alive = psutil.wait_procs(workers, timeout=STOP_TIMEOUT_S)
    assert not [p for p in alive if _alive(p)]


@pytest.mark.slow
def test_losing_a_node_fails_requests_in_flight_and_the_engine(on_cluster, tiny_llama):
    from tessellm.config import EngineArgs
    from tessellm.engine.async_engine import AsyncLLMEngine, EngineDeadError

    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main() -> tuple[list[BaseException], float, AsyncLLMEngine]:
        engine = AsyncLLMEngine.from_engine_args(EngineArgs(**ray_llm_args(tiny_llama)))
        engine.start()
        streams = []
        for i, prompt in enumerate(TEST_PROMPTS[:3]):
            stream = engine.new_stream()
            await stream.add(f"r{i}", prompt, long)
            streams.append(stream)
        await streams[0].next_outputs()  # generating: the requests are in flight
        on_cluster.raylet(on_cluster.dirs[1]).kill()  # node B goes away, its worker with it
        killed = time.monotonic()

        async def fails(stream) -> BaseException:
            with pytest.raises(EngineDeadError) as raised:
                while not stream.finished:
                    await stream.next_outputs()
            return raised.value

        # Bounded: a hang fails the test instead of waiting for a collective timeout.
        errors = await asyncio.wait_for(asyncio.gather(*map(fails, streams)), timeout=60)
        waited = time.monotonic() - killed
        assert not engine.is_running
        await engine.shutdown()
        return errors, waited, engine

    errors, waited, engine = asyncio.run(main())
    assert isinstance(engine.dead, WorkerError)
    for error in errors:
        assert f"rank 1 (node {NODE_B_IP}" in str(error)
        assert "died during execute" in str(error) or "lost its peers" in str(error)
    assert waited < 30


@pytest.mark.slow
def test_stopping_the_cluster_leaves_no_ray_process(cluster):
    assert cluster.track()  # node A is still up
    assert cluster.stop() == []
    names = ("raylet", "gcs_server", "log_monitor", "dashboard")
    leftover = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if any(n in " ".join(p.info["cmdline"] or []) for n in names)
        and any(d in " ".join(p.info["cmdline"] or []) for d in cluster.dirs)
        and _alive(p)
    ]
    assert leftover == []
