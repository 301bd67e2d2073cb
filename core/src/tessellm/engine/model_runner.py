"""Builds the model on its device, owns the KV cache, and runs one step's batch."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import numpy as np
import torch

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine import cache_binding
from tessellm.engine.pending_step import PendingStep, feed_sampled_tokens
from tessellm.engine.profile_run import profile_forward, warm_eager_steps
from tessellm.engine.runner_sleep import sleep_runner, wake_runner
from tessellm.engine.sample_fork import SampleForks
from tessellm.engine.sampler import Sampler, compute_prompt_logprobs
from tessellm.engine.spec_verify import verify_drafts
from tessellm.engine.transfer import to_device
from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionMetadata, kv_cache_torch_dtype
from tessellm.interfaces.model import HiddenStatesSink, ModelContext, ParallelInfo
from tessellm.interfaces.ops import bind_fused_ops
from tessellm.interfaces.platform import GraphRunner, GraphSpec, StepRunner
from tessellm.interfaces.schedule import SchedulerOutput, StepResult
from tessellm.layers.attention import Attention
from tessellm.lora.slots import LoRAManager
from tessellm.multimodal.runner import EncoderCache, has_images, step_input_embeds
from tessellm.plugins import PluginSet, get_plugins
from tessellm.selection import (
    build_quantization,
    choose_attention_backend,
    choose_platform,
    choose_quantization,
    default_dtype_for,
)

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        args: EngineArgs,
        resolved: ml.ResolvedModel,
        parallel: ParallelInfo | None = None,
        plugins: PluginSet | None = None,
    ) -> None:
        self.args = args
        self.parallel = parallel or ParallelInfo()
        plugins = plugins or get_plugins()
        self.platform, self.platform_choice = choose_platform(plugins, args.device)
        self.platform.set_up_process()
        self.device = self.platform.device(self.parallel.device_index)
        torch.manual_seed(args.seed)
        fmt = ml.weight_format(plugins, resolved)
        self.config = fmt.load_config(resolved.path)
        auto_dtype = default_dtype_for(plugins, self.platform, self.config, args.quantization)
        self.dtype = ml.resolve_dtype(args.dtype, auto_dtype)
        self.max_model_len = ml.max_model_len_of(self.config, args.max_model_len)
        spec = ml.attention_spec(
            self.config,
            self.device.type,
            self.dtype,
            args.block_size,
            self.parallel.world_size,
            plugins,
            args.kv_cache_dtype,
        )
        backend_cls, self.attention_choice = choose_attention_backend(
            plugins, self.platform, spec, args.attention_backend
        )
        self.attention = backend_cls(spec)
        self.quantization_choice = choose_quantization(
            plugins, self.platform, self.dtype, args.quantization, self.config
        )
        self.quantization = self.quantization_choice.name
        if self.quantization_choice.dequantize:  # the weight format hands out dense weights
            self.config.quantization_config = None
        self._plugins, self._resolved = plugins, resolved
        self.load_model()
        self.sleep_level = 0  # engine sleep: 0 awake, 1 KV freed (weights on the host), 2 all freed
        self.host_weights: dict[str, torch.Tensor] = {}  # level 1 on a device: the weights
        self.graph_runner: GraphRunner | None = None
        self.step_runner: StepRunner | None = None
        # Set by a proposer that reads the target's hidden states (interfaces.model).
        self.hidden_states_sink: HiddenStatesSink | None = None
        self.sampler = Sampler(args.seed)
        self.encoder_cache = EncoderCache()  # image embeddings while a prefill crosses them
        self.block_size = args.block_size
        self.num_blocks = 0

    def load_model(self) -> None:
        """Build the model and load its weights (at start, and waking from a deep sleep)."""
        plugins, resolved, args = self._plugins, self._resolved, self.args
        fmt = ml.weight_format(plugins, resolved)
        quant = build_quantization(plugins, self.quantization_choice, self.device, self.dtype)
        ctx = ModelContext(self.dtype, self.device, self.attention, quant, self.parallel)
        self.model = ml.build_model(plugins, self.config, ctx)
        with self.platform.inference_mode():
            ml.load_weights(self.model, fmt.iter_weights(resolved.path, self.config, self.dtype))
            quant.process_model_after_loading(self.model)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.cache_layout = cache_binding.runner_layout(self)
        self.lora: LoRAManager | None = None
        fused_ops = self.platform.fused_ops(self.dtype)
        if args.enable_lora:
            self.lora = LoRAManager(
                self.model,
                args.max_loras,
                args.max_lora_rank,
                args.max_cpu_loras or args.max_loras,
                fused_ops,
            )
        bind_fused_ops(self.model, fused_ops)

    def sleep(self, level: int) -> None:
        """Free the KV cache (its contents are lost) and, at level 1, move the weights to
        host memory (on a CPU they stay where they are); at level 2 free them too."""
        sleep_runner(self, level)

    def wake_up(self) -> None:
        """Undo ``sleep``: weights back (reloaded from the checkpoint after level 2), and a
        fresh KV cache of the same size."""
        wake_runner(self)

    # -- KV cache ------------------------------------------------------------------------
    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache stores: the model's dtype, or fp8 (``kv_cache_dtype``)."""
        return kv_cache_torch_dtype(self.args.kv_cache_dtype, self.dtype)

    def bytes_per_block(self) -> int:
        return cache_binding.page_bytes(self)

    def available_blocks(self, extra_bytes_per_block: int = 0) -> int:
        """How many KV blocks fit this rank's memory budget. ``extra_bytes_per_block``: what
        another cache indexed by the same block ids takes per block (a speculative draft's):
        the target gets ``t / (t + extra)`` of the budget, so both fit."""
        args = self.args
        if args.num_gpu_blocks_override:
            return args.num_gpu_blocks_override
        if args.kv_cache_memory_bytes:
            budget = args.kv_cache_memory_bytes
        else:
            self.platform.measure_peak_memory(lambda: profile_forward(self))
            budget = self.platform.available_kv_cache_bytes(
                args.gpu_memory_utilization, ml.model_bytes(self.model)
            )
        budget -= cache_binding.state_bytes(self)
        per_block = self.bytes_per_block() + extra_bytes_per_block
        if per_block == 0:  # recurrent layers only: blocks are bookkeeping
            return cache_binding.UNBOUNDED_PAGES if budget >= 0 else 0
        return max(0, budget // per_block)

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        dtype = self.kv_cache_dtype
        cache_binding.bind_caches(self, num_blocks)
        if dtype != self.dtype:
            from_checkpoint = sum(layer.kv_scales_from_checkpoint for layer in self.attn_layers)
            logger.info(
                "KV cache in %s: k/v scales of %d of %d layers from the checkpoint, 1.0 for "
                "the rest",
                str(dtype).removeprefix("torch."),
                from_checkpoint,
                len(self.attn_layers),
            )
        self.step_runner = self.platform.step_runner(self)
        if self.step_runner is not None and not self.cache_layout.single_table:
            raise ConfigError(
                f"the {self.platform_choice.chosen} platform's step runner serves one KV block "
                "table without recurrent state; for windowed layers start the engine with "
                "disable_hybrid_kv_cache_manager=True"
            )
        if self.step_runner is not None and self.args.enable_lora:
            raise ConfigError(
                f"LoRA adapters do not run on the {self.platform_choice.chosen} platform's "
                "step runner yet; leave enable_lora off"
            )
        if self.step_runner is not None and self.args.speculative_config is not None:
            raise ConfigError(
                f"speculative decoding does not run on the {self.platform_choice.chosen} "
                "platform's step runner yet; leave speculative_config unset"
            )
        # Graph runners know one block table (some, one per KV group) and no recurrent
        # state (docs/architecture.md).
        layout = self.cache_layout
        graphs_fit = layout.single_table or (
            not layout.has_state and getattr(self.platform, "graph_runner_serves_kv_groups", False)
        )
        if self.step_runner is None and not self.args.enforce_eager and not graphs_fit:
            logger.info(
                "steps run eagerly: %s",
                "graph runners keep no recurrent state"
                if layout.has_state
                else f"the {self.platform_choice.chosen} platform's graph runner reads one KV "
                f"block table, this model has {len(layout.groups)} KV groups "
                "(disable_hybrid_kv_cache_manager=True puts them in one)",
            )
        if self.step_runner is None and not self.args.enforce_eager and graphs_fit:
            spec = GraphSpec(
                self.args.max_num_seqs,
                self.max_model_len,
                self.block_size,
                self.parallel.world_size,
                model=self.args.model,
                max_draft_tokens=spec.num_speculative_tokens
                if (spec := self.args.speculative_config)
                else 0,
            )
            self.graph_runner = self.platform.graph_runner(self.model, self.attention, spec)
            if self.graph_runner is not None:
                self.graph_runner.capture()
                if self.platform.warm_eager_steps:
                    warm_eager_steps(self)

    # -- one step ------------------------------------------------------------------------
    def prepare_inputs(
        self, plan: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        seqs = plan.seqs
        bs = self.block_size
        q_lens = np.fromiter((len(s.token_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        starts = np.fromiter((s.start_pos for s in seqs), dtype=np.int64, count=len(seqs))
        cu = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        total = int(cu[-1])
        input_ids = np.fromiter((t for s in seqs for t in s.token_ids), dtype=np.int64, count=total)
        seq_index = np.repeat(np.arange(len(seqs)), q_lens)
        positions = np.arange(total, dtype=np.int64) - cu[seq_index] + starts[seq_index]
        # The block table in one masked assignment from one flat read of every block id
        # (a row-by-row fill costs a numpy call per request).
        num_blocks = np.fromiter((len(s.block_ids) for s in seqs), dtype=np.int64, count=len(seqs))
        flat_blocks = np.fromiter(
            itertools.chain.from_iterable(s.block_ids for s in seqs),
            dtype=np.int32,
            count=int(num_blocks.sum()),
        )
        table = np.zeros((len(seqs), int(num_blocks.max())), dtype=np.int32)
        table[np.arange(table.shape[1]) < num_blocks[:, None]] = flat_blocks
        slots = table[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = (starts + q_lens).astype(np.int32)
        sampled = np.fromiter((s.sample for s in seqs), dtype=bool, count=len(seqs))
        sample_rows = cu[1:][sampled] - 1
        if any(s.draft_token_ids for s in seqs):
            # Speculative drafts: a seq's last 1 + len(drafts) rows are scored.
            rows_per = np.fromiter(
                (len(s.draft_token_ids) + 1 for s in seqs), dtype=np.int64, count=len(seqs)
            )[sampled]
            firsts = np.repeat(sample_rows - rows_per + 1, rows_per)
            offsets = np.arange(int(rows_per.sum())) - np.repeat(
                np.cumsum(rows_per) - rows_per, rows_per
            )
            sample_rows = firsts + offsets

        dev = self.device
        qsl_cpu = torch.from_numpy(cu.astype(np.int32))
        seq_lens_cpu = torch.from_numpy(seq_lens)
        metadata = AttentionMetadata(
            query_start_loc=to_device(qsl_cpu, dev),
            seq_lens=to_device(seq_lens_cpu, dev),
            block_tables=to_device(torch.from_numpy(table), dev),
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        if not self.cache_layout.plain:
            cache_binding.add_layout_metadata(self, metadata, seqs, seq_index, positions)
        return (
            to_device(torch.from_numpy(input_ids), dev),
            to_device(torch.from_numpy(positions), dev),
            metadata,
            to_device(torch.from_numpy(sample_rows.astype(np.int64)), dev),
        )

    def execute(self, plan: SchedulerOutput) -> StepResult:
        return self.launch(plan).result()

    def launch(
        self,
        plan: SchedulerOutput,
        previous: tuple[SchedulerOutput, PendingStep] | None = None,
        defer_sampling: bool = False,
    ) -> PendingStep:
        """Queue the step's device work and return before it is done (on a device that
        runs asynchronously); ``result()`` waits for the sampled tokens. Logprobs, when
        asked, are read here (a wait). ``previous``: the step before, still running, whose
        sampled tokens stand in for this plan's placeholder tokens (schedule-ahead).

        Scheduled ahead, this runs while the previous step may not have started on the
        device: a host buffer given to a non-blocking copy (pinned staging) must not be
        rewritten here before that step's copy has run (two buffers, or an event).

        ``defer_sampling``: queue the forward pass only; ``sample()`` on what returns
        samples (the engine fills grammar bitmasks in between)."""
        self.platform.enter_step_thread()
        if plan.empty:
            return PendingStep(StepResult([]))
        if self.step_runner is not None:
            return self.step_runner.launch(plan, previous)
        with self.platform.inference_mode():
            return self._launch_eager(plan, previous, defer_sampling)

    def _launch_eager(
        self,
        plan: SchedulerOutput,
        previous: tuple[SchedulerOutput, PendingStep] | None,
        defer_sampling: bool = False,
    ) -> PendingStep:
        # Samples forked from their prompt's leader compute nothing (engine/sample_fork.py).
        forks = SampleForks.split(plan) if self.cache_layout.has_state else None
        if forks is not None and not (plan := forks.forward).seqs:
            return PendingStep(StepResult([]))  # a re-run part holding forks alone
        input_ids, positions, metadata, sample_rows = self.prepare_inputs(plan)
        if previous is not None:
            feed_sampled_tokens(plan, input_ids, *previous)
        hidden = None
        # Steps with images run eagerly: their image rows replace the placeholders' embeddings.
        embeds = None
        if has_images(plan):
            embeds = step_input_embeds(self.model, plan, input_ids, self.encoder_cache)
        # Steps with LoRA adapters run eagerly unless the graph runner says it serves them
        # (CUDA graphs over the LoRA kernels); compiled CPU steps hold no adapters.
        adapted = self.lora is not None and self.lora.prepare(plan, self.device)
        lora_ok = not adapted or getattr(self.graph_runner, "serves_lora", False)
        # The runner says which steps it covers (decodes; verification steps if it can).
        if self.graph_runner is not None and lora_ok and embeds is None:
            hidden = self.graph_runner(input_ids, positions, metadata)
        if hidden is None:
            self.attention.prepare(metadata)
            if embeds is None:
                hidden = self.model(input_ids, positions, metadata)
            else:
                hidden = self.model(input_ids, positions, metadata, inputs_embeds=embeds)
        if self.hidden_states_sink is not None:
            self.hidden_states_sink(plan, hidden)
        prompt_logprobs = compute_prompt_logprobs(hidden, plan, self.model.compute_logits)
        if forks is not None:  # after the forward wrote the leaders' states and pages
            plan, sample_rows = forks.plan, forks.apply(self, sample_rows)
        sampled = [s for s in plan.seqs if s.sample]
        if not sampled:
            return PendingStep(StepResult([], prompt_logprobs=prompt_logprobs))
        logits = self.model.compute_logits(hidden[sample_rows])
        if logits.shape[0] != len(sampled):  # speculative drafts to verify
            result = verify_drafts(self.sampler, logits, sampled)
            result.prompt_logprobs = prompt_logprobs
            return PendingStep(result)
        if defer_sampling:
            step = PendingStep(StepResult([], prompt_logprobs=prompt_logprobs))
            step.defer(self._deferred_sampler(logits, sampled))
            return step
        tokens, logprobs = self.sampler.sample(logits, sampled)
        return PendingStep(StepResult([], logprobs, prompt_logprobs), tokens)

    def _deferred_sampler(
        self, logits: torch.Tensor, sampled: list
    ) -> Callable[[], tuple[torch.Tensor, list | None]]:
        def sample() -> tuple[torch.Tensor, list | None]:
            with self.platform.inference_mode():
                return self.sampler.sample(logits, sampled)

        return sample
