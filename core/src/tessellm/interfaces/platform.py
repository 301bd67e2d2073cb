"""Hardware platforms: cheap detection plus the few device facts the engine needs."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from torch import nn

    from tessellm.engine.model_runner import ModelRunner, PendingStep
    from tessellm.interfaces.attention import AttentionBackend, AttentionMetadata
    from tessellm.interfaces.ops import FusedOps
    from tessellm.interfaces.schedule import SchedulerOutput


@dataclass(frozen=True, slots=True)
class GraphSpec:
    """What a graph runner needs to size its static buffers."""

    max_num_seqs: int  # the largest decode batch the scheduler forms
    max_model_len: int  # the longest context (sets the block table width)
    block_size: int
    world_size: int = 1  # tensor-parallel ranks (the forward has collectives above 1)
    # The model as the user named it (a known name, path or Hub ID), for messages and
    # cache listings; "" when the caller does not say (a runner then names it itself).
    model: str = ""
    # Speculative decoding's drafts per sequence (``num_speculative_tokens``; 0: off). A
    # runner may also cover verification steps: every sequence a decode with up to this
    # many drafts, the scheduler having allocated KV slots for all of them (it reserves
    # ``1 + max_draft_tokens`` positions per speculating sequence), so padding a sequence
    # to ``1 + max_draft_tokens`` query tokens writes only into its own blocks.
    max_draft_tokens: int = 0


class GraphRunner(Protocol):
    """Captures decode steps once and replays them (e.g. CUDA graphs).

    ``capture`` runs after the KV cache is bound. Calling the runner with a decode-only
    batch (one query token per sequence) returns the model's hidden states for its real
    tokens, or ``None`` when it has no graph for a batch that large (the caller then runs
    the model eagerly). ``None`` may also mean "not yet": a runner may return from
    ``capture`` at once and prepare its graphs in the background (the CPU platform builds
    its compiled steps in another process), switching a batch size over between two calls
    once its graph is ready; the caller needs no change for it, since the eager and graph
    paths give the same results. The runner is called for every eager step and returns
    ``None`` for what it does not cover (prompt chunks; verification steps with several
    tokens per sequence unless it has graphs for them, ``GraphSpec.max_draft_tokens``).
    """

    def capture(self) -> None: ...

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor | None: ...


class StepRunner(Protocol):
    """Runs whole steps in the model runner's place, on a device that compiles one graph
    per input shape (XLA): it pads each step to a bounded set of shapes, runs the model
    and samples on the device. Made by ``Platform.step_runner`` once the KV cache is
    bound (it may compile its graphs then); ``launch`` is ``ModelRunner.launch``'s
    contract (``previous``: the step before, whose sampled tokens replace this plan's
    placeholders)."""

    def launch(
        self, plan: SchedulerOutput, previous: tuple[SchedulerOutput, PendingStep] | None
    ) -> PendingStep: ...


class Platform(ABC):
    """One kind of device. Subclasses set the class attributes and implement the methods.

    ``is_available`` must not import heavy modules or initialise the device: it runs for
    every installed platform each time the engine chooses one.
    """

    name: ClassVar[str]
    device_type: ClassVar[str]  # the torch device type: "cpu", "cuda", "xla"
    priority: ClassVar[int] = 0  # higher wins when several are available
    distributed_backend: ClassVar[str] = "gloo"
    attention_backends: ClassVar[tuple[str, ...]] = ("torch",)  # preference order
    # True when ``graph_runner``'s runners serve a cache layout of several KV groups (a
    # block table per group, ``AttentionMetadata.kv_groups``: engine/cache_layout.py);
    # otherwise models with windowed layers in groups of their own run eagerly.
    graph_runner_serves_kv_groups: ClassVar[bool] = False
    # True where eager steps run kernels compiled on first use per shape class (Triton):
    # after ``graph_runner``'s capture the engine then runs one small eager step per class
    # of the longest query (engine/profile_run.py ``warm_eager_steps``), so no request's
    # step waits for a compile.
    warm_eager_steps: ClassVar[bool] = False
    # Whether a step with prompt work also carries the running requests' decode tokens
    # (``enable_mixed_batches`` when the user leaves it unset). Where a step's time is its
    # memory traffic (a GPU), decode tokens ride along in a prefill step almost free; where
    # it is compute (a CPU), each costs the same in any step, and mixing only delays the
    # waiting requests' first tokens: False runs prompt work alone, first.
    mixed_batches: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def is_available(cls) -> bool:
        """True when this machine can run the platform."""

    @classmethod
    def unavailable_reason(cls) -> str:
        """Why ``is_available`` said no, for ``tessellm plugins``."""
        return "not available on this machine"

    @classmethod
    def available_reason(cls) -> str:
        """What ``is_available`` found, for ``tessellm plugins`` ("" says nothing)."""
        return ""

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device(self.device_type)

    @abstractmethod
    def default_dtype(self) -> torch.dtype:
        """The fastest dtype this device computes well (used for ``dtype="auto"``)."""

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.bfloat16, torch.float16)

    def set_up_process(self) -> None:  # noqa: B027 - optional hook
        """Per-process set-up (threads, allocator settings) before the model is built."""

    def bind_step_thread(self) -> None:  # noqa: B027 - optional hook
        """Per-thread set-up on a thread that runs steps, before its first step and again
        when its intra-op thread count changes (the CPU gives the thread and its OpenMP
        workers a core each)."""

    def enter_step_thread(self) -> None:
        """Runners call this at every step; it calls ``bind_step_thread`` when needed."""
        # Thread-local, not keyed by thread id: a finished thread's id is reused.
        state = self.__dict__.setdefault("_step_thread", threading.local())
        threads = torch.get_num_threads()
        if getattr(state, "threads", None) != threads:
            state.threads = threads
            self.bind_step_thread()

    def measure_peak_memory(self, run_profile: Callable[[], None]) -> None:  # noqa: B027
        """Platforms that size the KV cache from the memory a forward pass at the largest
        batch needs call ``run_profile`` here and remember the peak for
        ``available_kv_cache_bytes``. The default does not call it (no profiling pass)."""

    @abstractmethod
    def available_kv_cache_bytes(self, utilization: float, model_bytes: int) -> int:
        """Bytes the KV cache may take, given a utilisation fraction and the model's size."""

    def graph_runner(
        self, model: nn.Module, attention: AttentionBackend, spec: GraphSpec
    ) -> GraphRunner | None:
        """An optional runner that captures and replays decode steps (CUDA graphs)."""
        return None

    def inference_mode(self) -> AbstractContextManager[object]:
        """The autograd-free context the runner loads weights and runs steps in.
        ``torch.inference_mode`` by default; XLA's lazy tensors need ``torch.no_grad``
        (inference tensors cannot be updated in place there)."""
        return torch.inference_mode()

    def step_runner(self, runner: ModelRunner) -> StepRunner | None:
        """An optional runner that takes over whole steps (static shapes for XLA); the
        runner's ``graph_runner`` is not used then. Called once the KV cache is bound."""
        return None

    def default_quantization(self, dtype: torch.dtype) -> str | None:
        """The quantization method to use when the user names none (None: ``"none"``).
        Only for methods that keep the checkpoint's weights as they are (a lossless
        repacking for faster kernels); a lossy method must be the user's choice."""
        return None

    def fused_ops(self, dtype: torch.dtype) -> FusedOps | None:
        """Fused kernels the shared layers should use on this device (None: plain torch)."""
        return None
