"""The draft model: built by tessellm's own ModelRunner on the target's platform, checked
to share the target's vocabulary, and run greedily over batched plans."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine.model_runner import ModelRunner
from tessellm.errors import ConfigError, ModelLoadError
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm.interfaces.speculative import ProposerContext, SpeculativeConfig

logger = logging.getLogger(__name__)


def draft_engine_args(
    config: SpeculativeConfig, context: ProposerContext, max_model_len: int
) -> EngineArgs:
    """The target's engine arguments with the draft's model and quantization: same
    platform, block size, attention backend and KV cache dtype; one process, no LoRA.
    ``dtype`` is the target's argument: ``"auto"`` resolves for the draft's own checkpoint
    and quantization (a GGUF draft runs in bf16 on the CPU, where its int4 kernels are
    fast, under an fp32 target), since the draft's dtype changes only its guesses.

    ``speculative_config`` keeps ``k`` and nothing else: the runner builds no proposer,
    it only tells the platform's graph runner to cover steps of up to ``1 + k`` tokens a
    sequence (GraphSpec.max_draft_tokens: the CPU's verification libraries), which is
    what a round's catch-up is once the draft keeps up."""
    return dataclasses.replace(
        context.args,
        model=config.model,
        quantization=config.quantization,
        speculative_config=SpeculativeConfig(
            method=config.method, num_speculative_tokens=config.num_speculative_tokens
        ),
        tokenizer=None,
        revision=None,
        max_model_len=max_model_len,
        tensor_parallel_size=1,
        enable_expert_parallel=False,
        distributed_executor_backend=None,
        enable_lora=False,
    )


def _tokenizer_of(context: ProposerContext, resolved: ml.ResolvedModel | None) -> Any | None:
    """The target's tokenizer (``resolved`` None) or the draft's; None without one."""
    plugins = context.plugins
    args = context.args
    try:
        if resolved is None:
            resolved = (
                context.resolved
                if args.tokenizer is None
                else ml.resolve_model(plugins, args.tokenizer, args.cache_dir)
            )
        return ml.weight_format(plugins, resolved).load_tokenizer(resolved.path)
    except ModelLoadError:
        return None


def check_same_vocabulary(
    context: ProposerContext, resolved: ml.ResolvedModel, model_config: Any
) -> int:
    """Refuse a draft whose token ids mean other tokens than the target's; return how many
    of the draft's logits columns may be proposed (ids below the target's vocabulary).

    Tokenizers that load are compared entry by entry; a draft whose logits are wider or
    narrower than the target's (padded embeddings) is fine when they agree. Without a
    tokenizer on either side the logits widths must be equal."""
    target_tok = _tokenizer_of(context, None)
    draft_tok = _tokenizer_of(context, resolved)
    draft_width = ml.logits_width(model_config, draft_tok) if draft_tok is not None else None
    if draft_width is None:
        draft_width = int(getattr(ml.text_config(model_config), "vocab_size", 0) or 0)
    target_width = context.vocab_size
    name = context.args.model
    draft = str(resolved.path)
    if target_tok is not None and draft_tok is not None:
        if len(target_tok) != len(draft_tok) or target_tok.get_vocab() != draft_tok.get_vocab():
            raise ConfigError(
                f"the draft model {draft} has another vocabulary than the target {name} "
                f"({len(draft_tok)} tokens against {len(target_tok)}, or the same ids name "
                "other tokens): a draft model must share the target's tokenizer"
            )
    elif draft_width != target_width:
        raise ConfigError(
            f"the draft model {draft} scores {draft_width} tokens, the target {name} "
            f"{target_width}: a draft model must share the target's vocabulary"
        )
    return min(draft_width, target_width)


class DraftRunner:
    """A ModelRunner for the draft, run without its sampler: greedy tokens only."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        if not config.model:
            raise ConfigError(
                'speculative_config with "method": "draft_model" needs a "model" (the draft: '
                "any model tessellm runs that shares the target's tokenizer)"
            )
        plugins = context.plugins
        args = context.args
        resolved = ml.resolve_model(plugins, config.model, args.cache_dir)
        model_config = ml.weight_format(plugins, resolved).load_config(resolved.path)
        self.proposable = check_same_vocabulary(context, resolved, model_config)
        self.max_model_len = min(context.max_model_len, ml.max_model_len_of(model_config, None))
        args = draft_engine_args(config, context, self.max_model_len)
        self.runner = ModelRunner(args, resolved, plugins=plugins)
        self.block_size = args.block_size

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_cache(num_blocks)

    def bytes_per_block(self) -> int:
        return self.runner.bytes_per_block()

    def greedy(self, seqs: list[ScheduledSeq]) -> list[int]:
        """Write the seqs' KV into the draft's cache and return, for each seq, the draft's
        argmax after its last token. Steps the platform's graph runner covers (one token a
        sequence; up to ``1 + k`` where it has verification graphs) run through it."""
        runner = self.runner
        plan = SchedulerOutput(seqs, sum(len(s.token_ids) for s in seqs))
        with runner.platform.inference_mode():
            input_ids, positions, metadata, sample_rows = runner.prepare_inputs(plan)
            hidden = None
            if runner.graph_runner is not None:
                hidden = runner.graph_runner(input_ids, positions, metadata)
            if hidden is None:
                runner.attention.prepare(metadata)
                hidden = runner.model(input_ids, positions, metadata)
            logits = runner.model.compute_logits(hidden[sample_rows])
            return torch.argmax(logits[:, : self.proposable], dim=-1).tolist()

    def describe(self) -> dict[str, str]:
        runner = self.runner
        return {
            "draft_model": str(runner.args.model),
            "draft_quantization": runner.quantization or "none",
            "draft_dtype": str(runner.dtype).removeprefix("torch."),
        }
