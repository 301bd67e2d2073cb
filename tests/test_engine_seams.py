"""The engine's seams (``tessellm.interfaces.engine``) as a plugin author meets them: an
executor that implements only the abstract members generates the default executor's
tokens; a class that misses a member, or claims a capability without its members, is
refused by name before the model loads; capability attributes, not probing, decide
whether the engine overlaps steps and schedules ahead."""

from __future__ import annotations

import dataclasses

import pytest

from tessellm.config import EngineArgs
from tessellm.engine.kv_cache_manager import KVCacheManager as DefaultKVCacheManager
from tessellm.engine.llm_engine import LLMEngine
from tessellm.engine.model_runner import ModelRunner
from tessellm.engine.scheduler import Scheduler as DefaultScheduler
from tessellm.errors import PluginError
from tessellm.executors.uniproc import UniProcExecutor
from tessellm.interfaces import engine as seams
from tessellm.plugins import PluginSet, Registration, get_plugins
from tessellm.sampling_params import SamplingParams

PROMPTS = [[5, 9, 13, 17], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41], [7] * 20, [100, 50, 25]]
PLUGIN = "test-seams"


class MinimalExecutor(seams.Executor):
    """What a third party must write: the abstract members, nothing else."""

    def __init__(self, args, resolved, plugins) -> None:
        self.runner = ModelRunner(args, resolved, plugins=plugins)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def available_blocks(self) -> int:
        return self.runner.available_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def execute(self, plan: seams.SchedulerOutput) -> seams.StepResult:
        return self.runner.execute(plan)


class AsynchronousMinimalExecutor(MinimalExecutor):
    asynchronous = True  # no feeds_sampled_tokens: overlap, but never schedule ahead


class AsynchronousUniProc(UniProcExecutor):
    asynchronous = True  # the CPU runs a launch at once; the engine's order is still GPU's


class NoAheadScheduler(DefaultScheduler):
    supports_schedule_ahead = False

    def advance(self, plan):
        raise AssertionError("advance called on a scheduler without schedule-ahead")

    def fill(self, plan, result):
        raise AssertionError("fill called on a scheduler without schedule-ahead")


class NoAheadKVCacheManager(DefaultKVCacheManager):
    supports_schedule_ahead = False


class NotConstructed(UniProcExecutor):
    def __init__(self, *args) -> None:
        raise AssertionError("a refused plugin must be caught before the model loads")


def plugins_with(**by_kind: dict[str, object]) -> PluginSet:
    """The installed plugins plus these registrations, without touching the global set."""
    base = get_plugins()
    registries = {kind: dict(names) for kind, names in base.registries.items()}
    for kind, names in by_kind.items():
        for name, cls in names.items():
            registries.setdefault(kind, {})[name] = Registration(kind, name, cls, PLUGIN)
    return dataclasses.replace(base, registries=registries)


def make_engine(model, plugins: PluginSet, **kwargs) -> LLMEngine:
    args = EngineArgs(model=str(model), dtype="float32", device="cpu", max_num_seqs=8, **kwargs)
    return LLMEngine(args, plugins=plugins)


def greedy_tokens(engine: LLMEngine, max_tokens: int = 10) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request(None, prompt, params) for prompt in PROMPTS]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    assert engine.stats()["num_running"] == 0
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[list[int]]:
    engine = make_engine(tiny_llama, get_plugins())
    try:
        assert isinstance(engine.executor, UniProcExecutor)
        return greedy_tokens(engine)
    finally:
        engine.shutdown()


def test_minimal_executor_defines_only_the_abstract_members():
    own = {name for name in vars(MinimalExecutor) if not name.startswith("_")}
    assert own == set(seams.Executor.__abstractmethods__)
    assert own == {"max_model_len", "available_blocks", "initialize_cache", "execute"}


@pytest.mark.parametrize("executor", [MinimalExecutor, AsynchronousMinimalExecutor])
def test_a_minimal_third_party_executor_generates_the_default_tokens(
    tiny_llama, reference, executor
):
    engine = make_engine(
        tiny_llama,
        plugins_with(executors={"minimal": executor}),
        distributed_executor_backend="minimal",
    )
    try:
        assert type(engine.executor) is executor
        assert engine.overlap_steps is executor.asynchronous  # launch() by default: execute
        assert engine.schedule_ahead is False  # it does not feed sampled tokens
        assert greedy_tokens(engine) == reference
        assert engine.describe() == {"executor": executor.__name__}
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    ("scheduler", "kv_manager", "ahead"),
    [
        (DefaultScheduler, DefaultKVCacheManager, True),
        (NoAheadScheduler, DefaultKVCacheManager, False),
        (DefaultScheduler, NoAheadKVCacheManager, False),
    ],
)
def test_capability_attributes_gate_schedule_ahead(
    tiny_llama, reference, scheduler, kv_manager, ahead
):
    plugins = plugins_with(
        executors={"async-uniproc": AsynchronousUniProc},
        schedulers={"gated": scheduler},
        kv_cache_managers={"gated": kv_manager},
    )
    engine = make_engine(
        tiny_llama,
        plugins,
        distributed_executor_backend="async-uniproc",
        scheduler="gated",
        kv_cache_manager="gated",
    )
    try:
        assert engine.overlap_steps is True
        assert engine.schedule_ahead is ahead
        # NoAheadScheduler's advance/fill raise: falling back means never calling them.
        assert greedy_tokens(engine) == reference
    finally:
        engine.shutdown()


def test_schedule_ahead_needs_async_scheduling(tiny_llama):
    plugins = plugins_with(executors={"async-uniproc": AsynchronousUniProc})
    engine = make_engine(
        tiny_llama, plugins, distributed_executor_backend="async-uniproc", async_scheduling=False
    )
    try:
        assert (engine.overlap_steps, engine.schedule_ahead) == (False, False)
    finally:
        engine.shutdown()


# -- refusals: each is raised before any executor is constructed --------------------------


class ExecutorWithoutExecute(seams.Executor):
    max_model_len = 64

    def available_blocks(self) -> int:
        return 8

    def initialize_cache(self, num_blocks: int) -> None:
        pass


class DuckTypedExecutor:  # every member, but not a subclass of the seam
    max_model_len = 64

    def available_blocks(self) -> int:
        return 8

    def initialize_cache(self, num_blocks: int) -> None:
        pass

    def execute(self, plan):
        raise AssertionError


class FeedsWithoutLaunch(MinimalExecutor):
    feeds_sampled_tokens = True


class SchedulerWithoutFinishOrStats(seams.Scheduler):
    def add_request(self, request):
        pass

    def schedule(self):
        return seams.SchedulerOutput([], 0)

    def update(self, plan, result):
        return []

    def has_unfinished(self) -> bool:
        return False


class AheadWithoutAdvance(NoAheadScheduler):
    supports_schedule_ahead = True
    advance = seams.Scheduler.advance  # the base's: not implemented
    fill = seams.Scheduler.fill


class KVManagerWithoutUsage(seams.KVCacheManager):
    def get_computed_blocks(self, request) -> int:
        return 0

    def can_allocate(self, request, num_new_tokens: int) -> bool:
        return True

    def allocate(self, request, num_new_tokens: int) -> None:
        pass

    def free(self, request) -> None:
        pass


@pytest.mark.parametrize(
    ("kind", "cls", "expected"),
    [
        ("executors", ExecutorWithoutExecute, r"executor 'bad'.*missing execute \(abstract"),
        ("executors", DuckTypedExecutor, r"executor 'bad'.* must be a subclass of .*Executor"),
        ("executors", FeedsWithoutLaunch, r"executor 'bad'.*missing launch \(it sets feeds"),
        (
            "schedulers",
            SchedulerWithoutFinishOrStats,
            r"scheduler 'bad'.*missing finish_requests \(abstract in Scheduler\); stats",
        ),
        ("schedulers", AheadWithoutAdvance, r"scheduler 'bad'.*missing advance and fill"),
        ("kv_cache_managers", KVManagerWithoutUsage, r"kv cache manager 'bad'.*missing usage"),
    ],
)
def test_a_plugin_missing_members_is_refused_by_name(tiny_llama, kind, cls, expected):
    # The executor is loaded first: a refused scheduler or KV manager must not let it load.
    registrations: dict[str, dict[str, object]] = {"executors": {"spy": NotConstructed}}
    registrations.setdefault(kind, {})["bad"] = cls
    plugins = plugins_with(**registrations)
    chosen = {"distributed_executor_backend": "spy"}
    argument = {"executors": "distributed_executor_backend", "schedulers": "scheduler"}
    chosen[argument.get(kind, "kv_cache_manager")] = "bad"
    with pytest.raises(PluginError, match=expected) as caught:
        make_engine(tiny_llama, plugins, **chosen)
    assert f"from plugin '{PLUGIN}'" in str(caught.value)


def test_every_builtin_implementation_subclasses_its_seam():
    plugins = get_plugins()
    for kind, base in (
        ("executors", seams.Executor),
        ("schedulers", seams.Scheduler),
        ("kv_cache_managers", seams.KVCacheManager),
    ):
        core = [
            name
            for name in plugins.names(kind)
            if plugins.get(kind, name).plugin == "tessellm.builtin"
        ]
        assert core, kind
        for name in core:
            seams.check_implementation(plugins.load(kind, name), base, f"{kind} {name}")
    assert set(plugins.names("executors")) >= {"uniproc", "mp", "ray"}


def test_default_launch_runs_execute_and_refuses_previous():
    result = seams.StepResult([7])

    class Fixed(MinimalExecutor):
        def __init__(self) -> None:
            pass

        def execute(self, plan):
            return result

    plan = seams.SchedulerOutput([], 0)
    assert Fixed().launch(plan).result() is result
    with pytest.raises(NotImplementedError, match="feeds_sampled_tokens"):
        Fixed().launch(plan, (plan, seams.CompletedStep(result)))


def test_the_data_crossing_the_seams_is_defined_in_interfaces():
    data = (
        seams.Request,
        seams.RequestStatus,
        seams.SchedulerOutput,
        seams.ScheduledSeq,
        seams.StepResult,
        seams.SchedulerConfig,
    )
    for cls in data:
        assert cls.__name__ in seams.__all__
        assert cls.__module__.startswith("tessellm.interfaces."), cls
    assert {"PLACEHOLDER_TOKEN", "PendingResult", "CompletedStep"} <= set(seams.__all__)
