"""One pipeline stage's model runner: its layers, and the hidden states it passes on.

A stage runs an ordinary :class:`~tessellm.engine.model_runner.ModelRunner` over the layers
it holds (``tessellm.layers.pipeline`` builds only those, and only their KV cache is
allocated: the runner's attention layers are the stage's). Its model is wrapped in
:class:`PipelineStageModel`, whose ``forward`` receives the previous stage's hidden states
and residual (point-to-point over the process group), runs the stage's layers and sends
the result on. The last stage also applies the final norm and returns the hidden states,
so the runner's usual step (prompt logprobs, LM head, sampler) runs there unchanged; the
other stages stop after sending.

Every message is preceded by a small header (a status, the token count): a stage whose
step raised (wherever it raised: it first takes the message due from the stage before)
sends "failed" instead of its hidden states, and each stage after it passes that on, so
no stage waits forever for data that will not come and the ranks stay in step (the
driver reports the first stage's exception). Sends are ``isend``: a stage goes
on to its next micro-batch while the next stage receives, which is what lets stages
overlap; a stage waits for its earlier sends only when it sends again.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine.model_runner import ModelRunner, PendingStep
from tessellm.errors import ConfigError
from tessellm.executors.worker import breaks_process_group
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.model import ParallelInfo
from tessellm.interfaces.pipeline import PipelineStage
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.layers.decoder import DecoderForCausalLM, DecoderModel
from tessellm.layers.pipeline import embed, run_stage_layers
from tessellm.plugins import PluginSet

_OK, _FAILED = 0, 1


class UpstreamStageError(RuntimeError):
    """An earlier pipeline stage raised in this step (its own exception is reported)."""


class StageLink:
    """Point-to-point exchange of ``(hidden, residual)`` with the neighbouring stages."""

    def __init__(
        self, stage: PipelineStage, hidden_size: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.stage = stage
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = device
        # isend works and the tensors they read, kept alive until they complete.
        self._sending: list[tuple[Any, torch.Tensor]] = []
        # This step's exchanges so far: each stage receives one message a step from the
        # stage before and sends one to the stage after, whatever happens (``abandon``).
        self.received = self.sent = False

    def begin_step(self) -> None:
        self.received = self.sent = False

    def abandon(self, num_tokens: int) -> None:
        """The step raised on this stage: take the message this step was due from the
        stage before (if not yet taken) and tell the stage after that the step failed."""
        if self.stage.prev_rank is not None and not self.received:
            with contextlib.suppress(UpstreamStageError):
                self.recv(num_tokens)
        if self.stage.next_rank is not None and not self.sent:
            self.sent = True
            self._isend(torch.tensor([_FAILED, 0], dtype=torch.int64, device=self.device))

    def _wait_sent(self) -> None:
        for work, _tensor in self._sending:
            work.wait()
        self._sending = []

    def _isend(self, *tensors: torch.Tensor) -> None:
        self._wait_sent()
        self._sending = [(dist.isend(t, dst=self.stage.next_rank), t) for t in tensors]

    def send(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> None:
        if residual is None:  # a stage holds at least one layer, which makes one
            raise RuntimeError("a pipeline stage produced no residual stream to send")
        header = torch.tensor([_OK, hidden.shape[0]], dtype=torch.int64, device=self.device)
        self.sent = True
        self._isend(header, torch.stack([hidden, residual]))

    def recv(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        src = self.stage.prev_rank
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        dist.recv(header, src=src)
        self.received = True
        status, count = header.tolist()
        if status != _OK:
            raise UpstreamStageError(f"pipeline stage {self.stage.stage - 1} failed this step")
        if count != num_tokens:  # the stages run different plans: nothing can continue
            raise RuntimeError(
                f"ProcessGroup out of step: stage {self.stage.stage} expected {num_tokens} "
                f"tokens' hidden states and got {count}"
            )
        payload = torch.empty(
            (2, num_tokens, self.hidden_size), dtype=self.dtype, device=self.device
        )
        dist.recv(payload, src=src)
        return payload[0], payload[1]


class PipelineStageModel(nn.Module):
    """The stage's share of the model behind the ``CausalLM`` calls the runner makes.

    ``exchange`` off (the profiling pass) stands zeros in for the received hidden states
    and sends nothing."""

    def __init__(self, inner: DecoderForCausalLM, stage: PipelineStage, link: StageLink) -> None:
        super().__init__()
        self.inner = inner
        self.stage = stage
        self.link = link
        self.exchange = True

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        stage, body = self.stage, self.inner.model
        num_tokens = input_ids.shape[0]
        residual: torch.Tensor | None = None
        if stage.is_first:
            hidden = embed(body, input_ids)
        elif self.exchange:
            hidden, residual = self.link.recv(num_tokens)
        else:
            link = self.link
            shape = (num_tokens, link.hidden_size)
            hidden = torch.zeros(shape, dtype=link.dtype, device=link.device)
            residual = torch.zeros_like(hidden)
        hidden, residual = run_stage_layers(
            body, stage.start_layer, stage.end_layer, positions, hidden, residual, metadata
        )
        if stage.is_last:
            hidden, _ = body.norm(hidden, residual)
        elif self.exchange:
            self.link.send(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.stage.is_last:  # only the profiling pass asks a stage without the head
            return hidden
        return self.inner.compute_logits(hidden)

    def load_weights(self, weights: Any) -> set[str]:
        return self.inner.load_weights(weights)


def check_stage_model(model: nn.Module, architecture: str) -> None:
    """Refuse a family whose model does not build and run stage by stage."""
    body = getattr(model, "model", None)
    if not (
        isinstance(model, DecoderForCausalLM)
        and type(model).forward is DecoderForCausalLM.forward
        and isinstance(body, DecoderModel)
        and type(body).forward is DecoderModel.forward
    ):
        raise ConfigError(
            f"{architecture} does not support pipeline parallelism yet (only families built "
            "on tessellm.layers.decoder's DecoderModel do); use pipeline_parallel_size=1"
        )


class PipelineStageRunner(ModelRunner):
    """A :class:`ModelRunner` for one stage (``parallel.pipeline``), always eager: CUDA
    graphs and compiled steps capture whole models, not stages."""

    def __init__(
        self,
        args: EngineArgs,
        resolved: ml.ResolvedModel,
        parallel: ParallelInfo,
        plugins: PluginSet | None = None,
    ) -> None:
        if parallel.pipeline is None:
            raise ValueError("PipelineStageRunner needs ParallelInfo.pipeline")
        self.stage = parallel.pipeline
        super().__init__(replace(args, enforce_eager=True), resolved, parallel, plugins)

    def load_model(self) -> None:
        super().load_model()
        check_stage_model(self.model, ml.architecture_of(self.config))
        hidden_size = ml.text_config(self.config).hidden_size
        link = StageLink(self.stage, hidden_size, self.dtype, self.device)
        self.model = PipelineStageModel(self.model, self.stage, link)
        self._restrict_cache_layout()

    def _restrict_cache_layout(self) -> None:
        """The per-layer cache layout (``engine/cache_layout.py``) lists the whole model's
        attention layers; this stage's cache holds its own. Only one-table layouts get
        here (``executors/pipeline.check_pipeline_config``)."""
        layout = self.cache_layout
        own = len(self.attn_layers)
        group = replace(layout.groups[0], layers=tuple(range(own)))
        self.cache_layout = replace(layout, groups=(group,), group_size=own)

    def available_blocks(self, *args: Any) -> int:
        # The profiling pass runs the stage alone: nothing to receive from the stage before.
        self.model.exchange = False
        try:
            return super().available_blocks(*args)
        finally:
            self.model.exchange = True

    def initialize_cache(self, num_blocks: int) -> None:
        super().initialize_cache(num_blocks)
        if self.step_runner is not None:
            raise ConfigError(
                f"pipeline parallelism does not run on the {self.platform_choice.chosen} "
                "platform's step runner yet; use pipeline_parallel_size=1"
            )

    def _launch_eager(
        self,
        plan: SchedulerOutput,
        previous: tuple[SchedulerOutput, PendingStep] | None,
        *args: Any,
    ) -> PendingStep:
        link = self.model.link
        link.begin_step()
        try:
            if self.stage.is_last:  # the usual step: the LM head and sampler run here
                return super()._launch_eager(plan, previous, *args)
            input_ids, positions, metadata, _rows = self.prepare_inputs(plan)
            if self.lora is not None:
                self.lora.prepare(plan, self.device)
            self.attention.prepare(metadata)
            self.model(input_ids, positions, metadata)
            return PendingStep(StepResult([]))
        except Exception as exc:
            if not breaks_process_group(exc):  # else nothing more can be exchanged
                link.abandon(sum(len(seq.token_ids) for seq in plan.seqs))
            raise
