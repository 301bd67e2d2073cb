"""Whole steps on XLA: padded to buckets, traced once per shape, one sync per step.

Each step is padded on the host to a bucketed shape (``buckets.py``), packed into two
arrays (``step_inputs.py``) and copied to the device; the model's forward pass, the LM
head on each sequence's last token and the sampler (``sampling.py``) are traced into
one program, which ``torch_xla.sync()`` compiles on first sight of its shape and runs.
Every shape is compiled at start-up (``precompile``), so a serving run compiles nothing
after it. The KV cache is one tensor per layer, updated in place by a scatter
(``attention.py``). Placeholder tokens (the engine scheduling a step before the last
one's tokens are known) are read inside the program from the previous step's token
buffer on the device, so the host never waits for a step to launch the next.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from tessellm.engine.sampler import Sampler, compute_prompt_logprobs
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm_tpu.attention import ragged_kernel_available
from tessellm_tpu.buckets import MIN_CONTEXT, Buckets, StepShape
from tessellm_tpu.sampling import (
    GREEDY,
    KINDS,
    needs_host_sampling,
    sample_on_device,
    sampling_rows,
)
from tessellm_tpu.step_inputs import FLOAT_FIELDS, HostStep, int_layout, pack_step, previous_rows

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class XlaPendingStep:
    """A step whose program was launched; ``result()`` copies its tokens to the host."""

    def __init__(
        self,
        result: StepResult,
        device_tokens: torch.Tensor,
        sampled_rows: list[int],
        host_tokens: list[int] | None = None,
    ) -> None:
        self._result = result
        self.device_tokens = device_tokens  # int32 [S_max], one row per plan sequence
        self._sampled_rows = sampled_rows
        self._host_tokens = host_tokens
        self._done = not sampled_rows

    def result(self) -> StepResult:
        if not self._done:
            if self._host_tokens is None:
                # The whole buffer: slicing on the device would trace a program per size.
                tokens = self.device_tokens.cpu().tolist()
                self._host_tokens = [tokens[row] for row in self._sampled_rows]
            self._result.sampled_token_ids = self._host_tokens
            self._done = True
        return self._result


class XlaStepRunner:
    def __init__(self, runner: ModelRunner) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        self._sync = torch_xla.sync
        self.runner = runner
        self.model = runner.model
        self.device = runner.device
        self.block_size = runner.block_size
        args = runner.args
        # The scheduler's token budget (LLMEngine's rule) bounds a step's tokens.
        budget = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
        # The kernel reads only the pages a sequence has: one context bucket suffices.
        min_context = runner.max_model_len if ragged_kernel_available() else MIN_CONTEXT
        self.buckets = Buckets.for_engine(
            budget,
            args.max_num_seqs,
            runner.max_model_len,
            self.block_size,
            min_context=min_context,
        )
        self.scratch_slot = runner.num_blocks * self.block_size
        self.host_sampler = Sampler(args.seed)
        # (shape, sampling kind) of every step run: what a serving run has exercised.
        self.shapes_run: set[tuple[StepShape, str]] = set()
        with torch.no_grad():
            self._bind_kv_cache()
            self.no_tokens = torch.zeros(
                self.buckets.max_seqs, dtype=torch.int32, device=self.device
            )
            xm.set_rng_state(args.seed, self.device)
            self._sync()
        self.precompile()

    def _bind_kv_cache(self) -> None:
        """One interleaved K/V tensor per layer with a scratch block (attention.py)."""
        runner = self.runner
        for layer in runner.attn_layers:
            shape = (
                runner.num_blocks + 1,
                self.block_size,
                2 * layer.num_kv_heads,
                layer.head_size,
            )
            kv = torch.zeros(shape, dtype=runner.kv_cache_dtype, device=self.device)
            layer.bind_kv_cache(kv, kv)

    # -- start-up ------------------------------------------------------------------------
    def precompile(self) -> None:
        """Trace and compile every (shape, sampling kind) program before serving."""
        shapes = self.buckets.all_shapes()
        total = len(shapes) * len(KINDS)
        logger.info(
            "XLA: compiling %d step programs (token buckets %s, context buckets %s blocks "
            "of %d, %d sampling kinds)",
            total,
            list(self.buckets.token_buckets),
            list(self.buckets.context_buckets),
            self.block_size,
            len(KINDS),
        )
        start = time.monotonic()
        done = 0
        for shape in shapes:
            for kind in KINDS:
                began = time.monotonic()
                step = pack_step([], shape, self.block_size, self.scratch_slot, {})
                with torch.no_grad():
                    # The outputs stay alive over the sync, as in a real step: a tensor
                    # dropped before it is no output, and its program a different one.
                    outputs = self._run(kind, step, self.no_tokens)
                    self._sync()
                    del outputs
                done += 1
                logger.info(
                    "XLA: program %d/%d (%d tokens, %d seqs, %d-token context, %s) in %.1f s",
                    done,
                    total,
                    shape.tokens,
                    shape.seqs,
                    shape.blocks * self.block_size,
                    kind,
                    time.monotonic() - began,
                )
        logger.info("XLA: %d step programs compiled in %.1f s", total, time.monotonic() - start)

    # -- one step ------------------------------------------------------------------------
    def _run(
        self, kind: str, step: HostStep, previous_tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Trace one step's program: (tokens [S_max], logits [S, vocab], hidden [T, h])."""
        shape = step.shape
        ints = torch.from_numpy(step.ints).to(self.device)
        floats = torch.from_numpy(step.floats).to(self.device)

        def field(name: str) -> torch.Tensor:
            offset, size = int_layout(shape)[name]
            return ints[offset : offset + size]

        feed_src = field("feed_src")
        fed = previous_tokens.index_select(0, feed_src.clamp(min=0))
        input_ids = torch.where(feed_src >= 0, fed, field("input_ids"))
        positions = field("positions")
        host_qsl = torch.from_numpy(step.field("query_start_loc"))
        metadata = AttentionMetadata(
            query_start_loc=field("query_start_loc"),
            seq_lens=field("seq_lens"),
            block_tables=field("block_tables").view(shape.seqs, shape.blocks),
            slot_mapping=field("slot_mapping"),
            max_query_len=shape.tokens,
            max_seq_len=shape.blocks * self.block_size,
            query_start_loc_cpu=host_qsl,
            seq_lens_cpu=torch.from_numpy(step.field("seq_lens")),
            extra={
                "positions": positions,
                "token_seq": field("token_seq"),
                "num_seqs": field("num_seqs"),
            },
        )
        hidden = self.model(input_ids, positions, metadata)
        logits = self.model.compute_logits(hidden.index_select(0, field("sample_rows")))
        temperature, top_p, min_p = floats.view(len(FLOAT_FIELDS), shape.seqs)
        tokens = sample_on_device(
            kind, logits, field("greedy"), temperature, field("top_k"), top_p, min_p
        )
        tokens = F.pad(tokens, (0, self.buckets.max_seqs - shape.seqs))
        return tokens, logits, hidden

    def _shape_of(self, plan: SchedulerOutput) -> StepShape:
        bs = self.block_size
        blocks = max(-(-(s.start_pos + len(s.token_ids)) // bs) for s in plan.seqs)
        tokens = sum(len(s.token_ids) for s in plan.seqs)
        return self.buckets.shape_for(tokens, len(plan.seqs), blocks)

    def launch(
        self,
        plan: SchedulerOutput,
        previous: tuple[SchedulerOutput, XlaPendingStep] | None = None,
    ) -> XlaPendingStep:
        with torch.no_grad():
            return self._launch(plan, previous)

    def _launch(
        self, plan: SchedulerOutput, previous: tuple[SchedulerOutput, XlaPendingStep] | None
    ) -> XlaPendingStep:
        seqs = plan.seqs
        sampled_rows = [i for i, s in enumerate(seqs) if s.sample]
        sampled = [seqs[i] for i in sampled_rows]
        on_host = any(needs_host_sampling(s) for s in sampled)
        kind, rows = sampling_rows(sampled if sampled else seqs)
        if on_host or kind == GREEDY:
            kind, rows = GREEDY, None
        else:
            rows = _rows_for_plan(seqs, sampled_rows, rows)
        feed_rows = previous_rows(previous[0]) if previous is not None else {}
        previous_tokens = previous[1].device_tokens if previous is not None else self.no_tokens
        step = pack_step(
            seqs, self._shape_of(plan), self.block_size, self.scratch_slot, feed_rows, rows
        )
        tokens, logits, hidden = self._run(kind, step, previous_tokens)
        self._sync()  # the step's one sync: compile (cached) and launch the program
        self.shapes_run.add((step.shape, kind))

        prompt_logprobs = None
        if any(s.prompt_logprob_token_ids for s in seqs):
            # Rare: traced per shape outside the bucketed programs (compiles on demand).
            prompt_logprobs = compute_prompt_logprobs(hidden, plan, self.model.compute_logits)
        result = StepResult([], None, prompt_logprobs)
        if not on_host:
            return XlaPendingStep(result, tokens, sampled_rows)
        host_logits = logits.cpu()[torch.tensor(sampled_rows)]
        host_tokens, logprobs = self.host_sampler.sample(host_logits, sampled)
        result.logprobs = logprobs
        token_list = host_tokens.tolist()
        padded = np.zeros(self.buckets.max_seqs, dtype=np.int32)
        padded[sampled_rows] = token_list
        device_tokens = torch.from_numpy(padded).to(self.device)
        return XlaPendingStep(result, device_tokens, sampled_rows, token_list)


def _rows_for_plan(
    seqs: list, sampled_rows: list[int], rows: tuple[np.ndarray, ...] | None
) -> tuple[np.ndarray, ...] | None:
    """Per-sampled-sequence sampling rows spread to one row per plan sequence (the
    others greedy: their tokens are not read)."""
    if rows is None:
        return None
    out = []
    for column, fill in zip(rows, (1, 1.0, 0, 1.0, 0.0), strict=True):
        full = np.full(len(seqs), fill, dtype=column.dtype)
        full[sampled_rows] = column
        out.append(full)
    return tuple(out)
