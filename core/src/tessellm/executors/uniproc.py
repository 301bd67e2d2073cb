"""The in-process executor: one model runner, no parallelism."""

from __future__ import annotations

from tessellm.config import EngineArgs
from tessellm.engine.model_runner import ModelRunner, PendingStep
from tessellm.errors import ConfigError
from tessellm.interfaces.engine import Executor, PendingResult, SchedulerOutput, StepResult
from tessellm.model_loader import ResolvedModel
from tessellm.plugins import PluginSet


def describe_runner(runner: ModelRunner) -> dict[str, str]:
    """The platform, attention backend, dtype, device and quantization a runner ended up with."""
    return {
        "platform": runner.platform_choice.explain("platform"),
        "attention": runner.attention_choice.explain("attention"),
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": str(runner.device),
        "quantization": runner.quantization,
    }


class UniProcExecutor(Executor):
    name = "uniproc"

    # ``launch`` takes ``previous``: the engine may schedule a step before the tokens of
    # the step still running are known (placeholders, filled in on the device).
    feeds_sampled_tokens = True
    verifies_drafts = True  # the ModelRunner verifies speculative drafts
    supports_sleep = True

    def __init__(self, args: EngineArgs, resolved: ResolvedModel, plugins: PluginSet) -> None:
        if args.pipeline_parallel_size > 1:
            raise ConfigError(
                "the uniproc executor runs the whole model in one process: "
                "pipeline_parallel_size > 1 needs the mp or ray executor"
            )
        self.runner = ModelRunner(args, resolved, plugins=plugins)

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def describe(self) -> dict[str, str]:
        return describe_runner(self.runner)

    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        return self.runner.available_blocks(extra_bytes_per_block)

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    @property
    def asynchronous(self) -> bool:  # type: ignore[override]
        """Whether ``launch`` returns before the device is done (not so on the CPU)."""
        return self.runner.device.type != "cpu"

    def execute(self, plan: SchedulerOutput) -> StepResult:
        return self.runner.execute(plan)

    @property
    def defers_sampling(self) -> bool:  # type: ignore[override]
        """The eager path can; a platform's whole-step runner (TPU) samples inside it."""
        return self.runner.step_runner is None

    def launch(
        self,
        plan: SchedulerOutput,
        previous: tuple[SchedulerOutput, PendingResult] | None = None,
        defer_sampling: bool = False,
    ) -> PendingStep:
        """Queue the step; ``result()`` on what returns waits for its sampled tokens."""
        # ``previous`` is always this executor's own launch: a ``PendingStep``.
        return self.runner.launch(plan, previous, defer_sampling)  # type: ignore[arg-type]

    def sleep(self, level: int) -> None:
        self.runner.sleep(level)

    def wake_up(self) -> None:
        self.runner.wake_up()

    def shutdown(self) -> None:
        pass
