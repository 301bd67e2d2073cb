"""The engine: requests in, ``step()`` = schedule → run → update, outputs out."""

from __future__ import annotations

import gc
import itertools
import logging
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine import cache_layout
from tessellm.engine import structured_output as so
from tessellm.engine import structured_steps as so_steps
from tessellm.engine.engine_setup import (
    fit_max_model_len,
    load_seam,
    scheduler_config,
    tune_garbage_collector,
)
from tessellm.engine.engine_sleep import EngineSleep
from tessellm.engine.output_processor import OutputProcessor, child_id
from tessellm.engine.pipeline_loop import PipelineLoop, check_pipelining
from tessellm.engine.pooling import check_generative
from tessellm.engine.speculative import (
    build_proposer,
    build_speculator,
    kv_cache_blocks,
    proposer_class,
)
from tessellm.engine.step_recovery import apply_result, fail_unprocessed, is_fatal, recover_step
from tessellm.engine.validation import RequestValidation
from tessellm.errors import EngineSleepingError, InvalidRequestError
from tessellm.interfaces.engine import (
    Executor,
    KVCacheManager,
    PendingResult,
    Request,
    RequestStatus,
    Scheduler,
    SchedulerOutput,
    StepResult,
)
from tessellm.lora.request import LoRARequest
from tessellm.multimodal.processor import attach_images, build_processor
from tessellm.outputs import RequestOutput
from tessellm.plugins import PluginSet, get_plugins
from tessellm.sampling_params import MAX_SEED, SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine(RequestValidation, EngineSleep):
    def __init__(self, args: EngineArgs, plugins: PluginSet | None = None) -> None:
        self.args = args
        self.plugins = plugins = plugins or get_plugins()
        start = time.monotonic()
        self.resolved = ml.resolve_model(plugins, args.model, args.cache_dir, args.revision)
        fmt = ml.weight_format(plugins, self.resolved)
        self.model_config = fmt.load_config(self.resolved.path)
        check_generative(args, plugins, self.model_config, self.resolved.path)
        tok_source = (
            self.resolved
            if args.tokenizer is None
            else ml.resolve_model(plugins, args.tokenizer, args.cache_dir)
        )
        self.tokenizer = ml.weight_format(plugins, tok_source).load_tokenizer(tok_source.path)
        # The logits' width; token ids a request names must also be ones the tokenizer has.
        self.vocab_size: int = ml.logits_width(self.model_config, self.tokenizer)
        self.max_token_id: int = min(self.vocab_size, len(self.tokenizer)) - 1
        self.eos_token_ids = ml.model_eos_ids(self.model_config, self.tokenizer, self.resolved.path)
        # A vision-language model's image processing (None for a text model).
        self.multimodal = build_processor(
            plugins, self.model_config, self.resolved.path, self.tokenizer, args
        )
        self.structured = so.StructuredOutputManager(
            plugins, self.tokenizer, self.vocab_size, self.eos_token_ids, args
        )
        if args.speculative_config is not None:  # an unknown method fails before loading
            proposer_class(plugins, args.speculative_config)
        executor_name = args.distributed_executor_backend or (
            "uniproc" if args.tensor_parallel_size * args.pipeline_parallel_size == 1 else "mp"
        )
        executor_cls = load_seam(plugins, "executors", executor_name, Executor)
        scheduler_cls = load_seam(plugins, "schedulers", args.scheduler, Scheduler)
        kv_cls = load_seam(plugins, "kv_cache_managers", args.kv_cache_manager, KVCacheManager)
        layout = cache_layout.layout_for(plugins, self.model_config, args)
        cache_layout.check_layout_support(kv_cls, layout, args)
        self.executor: Executor = executor_cls(args, self.resolved, plugins)
        self.max_model_len = self.executor.max_model_len
        # Before the pool is sized: a proposer's weights and its own cache share the budget.
        proposer = build_proposer(self, scheduler_cls)
        num_blocks = kv_cache_blocks(self.executor, proposer)
        # Beyond what max_num_seqs full-length sequences could hold, blocks are wasted memory.
        needed = cache_layout.pages_needed(layout, args, self.max_model_len)
        num_blocks = min(num_blocks, needed) if not args.num_gpu_blocks_override else num_blocks
        self.max_model_len = fit_max_model_len(num_blocks, args.block_size, self.max_model_len)
        self.executor.initialize_cache(num_blocks)
        kv = cache_layout.make_kv_cache_manager(kv_cls, num_blocks, args, layout)
        sched_config = scheduler_config(args, self.max_model_len, self.executor, plugins)
        self.scheduler: Scheduler = scheduler_cls(sched_config, kv)
        self.speculator = build_speculator(self, proposer, num_blocks)
        self.kv_cache_manager: KVCacheManager = kv
        self.num_blocks = num_blocks
        self.output_processor = OutputProcessor(self.tokenizer)
        # Overlap a step's output processing with the next step's device work where the
        # executor launches work without waiting for it (a GPU, not the CPU).
        # Pipeline stages each run a different plan (engine/pipeline_loop.py).
        depth = int(self.executor.max_concurrent_batches)
        self.pipeline = PipelineLoop(self, depth) if depth > 1 else None
        if self.pipeline is not None:
            check_pipelining(self, depth)
        self.overlap_steps: bool = (
            args.async_scheduling and bool(self.executor.asynchronous) and self.pipeline is None
        )
        # Schedule before the running step's tokens are known: needs an executor that
        # fills placeholders in on the device, a scheduler with advance/fill and a KV
        # cache manager that withholds the blocks a placeholder completes.
        self.schedule_ahead: bool = (
            self.overlap_steps
            and bool(self.executor.feeds_sampled_tokens)
            and bool(self.scheduler.supports_schedule_ahead)
            and bool(kv.supports_schedule_ahead)
            # Drafts are proposed from the known tokens, which a step scheduled ahead lacks:
            # with speculation the loop overlaps output processing only.
            and self.speculator is None
        )
        self._in_flight: tuple[SchedulerOutput, PendingResult] | None = None
        # A next step whose launch raised (overlapped loop): recovered at the end of step().
        self._failed_launch: tuple[SchedulerOutput, Any, Exception] | None = None
        self._ids = itertools.count()
        self._checked_adapters: set[tuple[int, str]] = set()
        self.sleep_level = 0  # 0 awake; 1 or 2 asleep (sleep())
        self.counters = {
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "steps": 0,
            "batched_seqs_max": 0,
            "computed_tokens": 0,
        }
        tune_garbage_collector()
        self.startup_seconds = time.monotonic() - start
        if plugins.manager is not None:
            plugins.manager.hook.engine_started(engine=self)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def compile_structured(self, params: SamplingParams) -> Future[Any] | None:
        """The (cached) compile of ``params``' grammar, or ``None``; thread-safe. It fails
        with ``InvalidRequestError`` naming the problem of an invalid schema or regex."""
        constraint = params.structured_outputs
        return None if constraint is None else self.structured.submit(constraint)

    def validate_structured(self, params: SamplingParams) -> None:
        """Compile ``params``' grammar now (cached): ``InvalidRequestError`` if invalid."""
        if (future := self.compile_structured(params)) is not None:
            future.result()

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
        multi_modal_data: dict[str, Any] | None = None,
    ) -> str:
        """``multi_modal_data``: ``{"image": PIL image or list}`` for the prompt's image
        placeholders (vLLM's shape), for a model that takes images."""
        params = params or SamplingParams()
        if self.sleep_level:
            raise EngineSleepingError("the engine is asleep; wake it up (POST /wake_up) first")
        if lora_request is not None:
            self.validate_lora(lora_request)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.output_processor.parents:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        token_ids, images = attach_images(self.multimodal, token_ids, multi_modal_data)
        self.validate_prompt(token_ids, params)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=(params.seed + i) % (MAX_SEED + 1), n=1)
            children.append(
                Request(
                    child_id(request_id, i, params.n),
                    token_ids,
                    child_params,
                    eos_token_ids=self.eos_token_ids,
                    priority=priority,
                    lora_request=lora_request,
                    # Samples of one prompt: the first computes it, the others reuse its KV.
                    prompt_leader_id=child_id(request_id, 0, params.n) if i else None,
                    mm_inputs=images,
                )
            )
        so_steps.schedule_or_park(self, request_id, children)
        self.output_processor.add(request_id, text, children)
        self.counters["prompt_tokens"] += len(token_ids)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        outputs = []
        for parent_id in ids:
            self.scheduler.abort_requests(self.output_processor.child_ids(parent_id))
            out = self.output_processor.abort(parent_id)
            if out is not None:
                outputs.append(out)
        self.structured.sweep(self.output_processor)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return (
            self._in_flight is not None
            or (self.pipeline is not None and bool(self.pipeline.in_flight))
            or self.scheduler.has_unfinished()
            or bool(self.output_processor.parents)
        )

    # -- the step ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run, update, and return this step's outputs.

        With ``overlap_steps`` the next step is scheduled and launched right after the
        update, before this step's outputs are built (detokenized, checked for stop
        strings): the device runs it meanwhile, and it is what the next call waits for.
        A request that a stop string (or an abort) finishes meanwhile is already in that
        next step: its extra token is dropped there, as with vLLM's async scheduling.

        With ``schedule_ahead`` too, the next step is scheduled and launched before this
        step's tokens are known: the scheduler counts them as placeholders, which the
        device fills in from this step's sampled tokens. Update, schedule and launch then
        also run while the device works, behind this step on the device's queue.
        """
        if self.pipeline is not None:
            return self.pipeline.step()
        idle = self._in_flight is None and not self.scheduler.has_unfinished()
        admitted = so_steps.admit_parked(self, idle)
        if self._in_flight is not None:
            plan, pending = self._in_flight
            self._in_flight = None
        else:
            plan = self._schedule(propose=True)
            try:
                pending = self._launch(plan)
            except Exception as exc:
                if is_fatal(exc):
                    raise
                return admitted + recover_step(self, plan, None, exc)
        ahead = self.overlap_steps and self.schedule_ahead and self._can_schedule_ahead(plan)
        if ahead:
            self.scheduler.advance(plan)
            self._launch_next((plan, pending))
        try:
            result = pending.result()
        except Exception as exc:
            # Scheduled ahead, the scheduler has counted ``plan`` as computed and the next
            # step is built on its placeholders; the seams cannot undo that, so this stops
            # the engine (there only the device fails after launch: not attributable anyway).
            if ahead or is_fatal(exc):
                raise
            return admitted + recover_step(self, plan, None, exc)
        changed, failed = apply_result(self, plan, result, ahead)
        if self.speculator is not None:
            self.speculator.record(plan, result, changed)
        # Before the next launch: its bitmasks depend on this step's tokens.
        admitted += failed + so_steps.advance_matchers(self, changed)
        so_steps.sample_deferred(self)
        if self.overlap_steps and not ahead:
            self._launch_next(None)
        return self.step_outputs(plan, result, changed, admitted)

    def step_outputs(
        self,
        plan: SchedulerOutput,
        result: StepResult,
        changed: list[Request],
        admitted: list[RequestOutput],
    ) -> list[RequestOutput]:
        """A step's outputs once its result is applied (``changed``: the requests it
        advanced); ``admitted``: outputs gathered earlier in the step, which come first."""
        logprobs: dict[str, Any] = {}
        if result.logprobs is not None:
            sampled_ids = [s.request_id for s in plan.seqs if s.sample]
            entries: list[Any] = result.logprobs
            if result.draft_logprobs is not None:  # each request's tokens, drafts first
                entries = [
                    None if e is None else [*(d or []), e]
                    for d, e in zip(result.draft_logprobs, result.logprobs, strict=True)
                ]
            logprobs = dict(zip(sampled_ids, entries, strict=True))
        outputs, stopped = self.output_processor.process(changed, logprobs, result.prompt_logprobs)
        outputs = admitted + outputs + fail_unprocessed(self, plan)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        c = self.counters
        c["steps"] += 1
        c["generation_tokens"] += len(result.sampled_token_ids)
        if result.num_accepted_drafts is not None:
            c["generation_tokens"] += sum(result.num_accepted_drafts)
        c["computed_tokens"] += plan.num_batched_tokens
        c["batched_seqs_max"] = max(c["batched_seqs_max"], len(plan.seqs))
        if self._failed_launch is not None:
            failed, previous, exc = self._failed_launch
            self._failed_launch = None
            outputs += recover_step(self, failed, previous, exc)
        self.structured.sweep(self.output_processor)
        return outputs

    def _launch(
        self, plan: SchedulerOutput, previous: tuple[SchedulerOutput, PendingResult] | None = None
    ) -> PendingResult:
        if previous is not None and so_steps.defer_bitmasks(self, plan):
            # Its bitmasks wait for ``previous``'s tokens: filled, then sampled, in step().
            pending = self.executor.launch(plan, previous, defer_sampling=True)  # type: ignore[call-arg]
            self.structured.deferred = (plan, pending, previous)
            return pending
        self.structured.fill_bitmasks(plan)
        return self.executor.launch(plan, previous)

    def _schedule(self, propose: bool) -> SchedulerOutput:
        """The next plan; with speculative decoding, drafts are proposed first (not when
        ``propose`` is False: scheduled ahead, the last tokens are placeholders)."""
        if self.speculator is not None and propose:
            self.speculator.propose(self.scheduler.speculation_candidates())
        return self.scheduler.schedule()

    def _launch_next(self, previous: tuple[SchedulerOutput, PendingResult] | None) -> None:
        if self.scheduler.has_unfinished():
            plan = self._schedule(propose=previous is None)
            if not plan.empty:
                try:
                    self._in_flight = (plan, self._launch(plan, previous))
                except Exception as exc:
                    if is_fatal(exc):
                        raise
                    # This step's outputs come first; the failed one is recovered after.
                    self._failed_launch = (plan, previous, exc)

    def _can_schedule_ahead(self, plan: SchedulerOutput) -> bool:
        """Not when a sampling request reads its own output history (penalties,
        min_tokens; a grammar's bitmask unless the executor ``defers_sampling``): the next
        step's copy of it would hold a placeholder. Nor after speculative drafts: how many
        tokens the step adds is known only from its result."""
        deferrable = bool(self.executor.defers_sampling)
        for seq in plan.seqs:
            p = seq.params
            if seq.sample and (
                seq.draft_token_ids
                or (seq.token_bitmask is not None and not deferrable)
                or p.presence_penalty
                or p.frequency_penalty
                or p.repetition_penalty != 1.0
                or p.min_tokens
            ):
                return False
        return True

    def stats(self) -> dict[str, float]:
        spec = self.speculator.stats() if self.speculator is not None else {}
        return {
            **self.scheduler.stats(),
            **self.counters,
            **spec,
            "num_blocks": self.num_blocks,
        }

    def describe(self) -> dict[str, str]:
        return self.executor.describe()

    def shutdown(self) -> None:
        self._in_flight = None
        self._failed_launch = None
        if self.pipeline is not None:
            self.pipeline.clear()
        self.structured.shutdown()
        self.executor.shutdown()
        gc.unfreeze()  # the engine's objects may be collected again once dropped
