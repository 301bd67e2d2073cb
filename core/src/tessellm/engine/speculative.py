"""The engine's side of speculative decoding: asks the proposer for drafts before each
step and counts what the target accepted (``interfaces.speculative`` says how it works)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tessellm.errors import ConfigError
from tessellm.interfaces.engine import (
    Executor,
    Request,
    RequestStatus,
    SchedulerOutput,
    StepResult,
)
from tessellm.interfaces.speculative import Proposer, ProposerContext, SpeculativeConfig
from tessellm.plugins import PluginSet

if TYPE_CHECKING:
    from tessellm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

KIND = "speculative_proposers"


def proposer_class(plugins: PluginSet, config: SpeculativeConfig) -> type[Proposer]:
    """The proposer class ``config.method`` names; ``ConfigError`` for one not installed
    (checked before the model loads)."""
    if plugins.get(KIND, config.method) is None:
        known = ", ".join(sorted(plugins.names(KIND))) or "none installed"
        raise ConfigError(
            f"unknown speculative method {config.method!r} (installed: {known}); install the "
            "plugin that provides it (e.g. tessellm-spec-ngram for 'ngram')"
        )
    cls = plugins.load(KIND, config.method)
    if not (isinstance(cls, type) and issubclass(cls, Proposer)):
        raise ConfigError(
            f"speculative method {config.method!r} is not a "
            "tessellm.interfaces.speculative.Proposer subclass"
        )
    return cls


def load_proposer(
    plugins: PluginSet, config: SpeculativeConfig, context: ProposerContext
) -> Proposer:
    """The proposer ``config.method`` names, built."""
    return proposer_class(plugins, config)(config, context)


class Speculator:
    """Drafts for the decoding requests before a step; acceptance counters after it."""

    def __init__(self, proposer: Proposer) -> None:
        self.proposer = proposer
        self.config = proposer.config
        self.num_drafts = 0  # (request, step) pairs that carried drafts
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_steps = 0  # steps proposed for
        self.proposer_seconds = 0.0
        self._logged_off = False

    def propose(self, candidates: Sequence[Request]) -> None:
        """Set ``spec_token_ids`` on the requests that should speculate this step."""
        limit = self.config.disable_by_batch_size
        if not candidates or (limit and len(candidates) > limit):
            if candidates and not self._logged_off:
                logger.info(
                    "speculative decoding pauses while more than %d requests run "
                    "(disable_by_batch_size)",
                    limit,
                )
                self._logged_off = True
            return
        # A grammar's bitmask is filled for one position per step: constrained requests
        # decode one token at a time.
        eligible = [r for r in candidates if r.params.structured_outputs is None]
        if not eligible:
            return
        start = time.perf_counter()
        k = self.config.num_speculative_tokens
        drafts = self.proposer.propose(eligible, [k] * len(eligible))
        self.proposer_seconds += time.perf_counter() - start
        self.num_steps += 1
        for request, tokens in zip(eligible, drafts, strict=True):
            request.spec_token_ids = list(tokens[:k])

    def record(self, plan: SchedulerOutput, result: StepResult, changed: list[Request]) -> None:
        """Count the drafts ``plan`` carried and how many ``result`` accepted; tell the
        proposer which requests finished or were preempted."""
        accepted = result.num_accepted_drafts
        if accepted is not None:
            index = -1
            for seq in plan.seqs:
                index += seq.sample
                if seq.sample and seq.draft_token_ids:
                    self.num_drafts += 1
                    self.num_draft_tokens += len(seq.draft_token_ids)
                    self.num_accepted_tokens += accepted[index]
        gone = [r.request_id for r in changed if r.status is not RequestStatus.RUNNING]
        if gone or plan.preempted_ids:
            self.proposer.finished([*gone, *plan.preempted_ids])

    def stats(self) -> dict[str, float]:
        drafts = self.num_drafts
        return {
            "spec_decode_num_drafts": drafts,
            "spec_decode_num_draft_tokens": self.num_draft_tokens,
            "spec_decode_num_accepted_tokens": self.num_accepted_tokens,
            "spec_decode_acceptance_rate": (
                self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
            ),
            # Tokens per verified step of a request: its accepted drafts plus its own token.
            "spec_decode_mean_accepted_length": (
                1 + self.num_accepted_tokens / drafts if drafts else 0.0
            ),
            "spec_decode_proposer_seconds": self.proposer_seconds,
            "spec_decode_proposer_ms_per_step": (
                1000 * self.proposer_seconds / self.num_steps if self.num_steps else 0.0
            ),
        }


def build_proposer(engine: LLMEngine, scheduler_cls: type) -> Proposer | None:
    """The engine's proposer, or None without ``speculative_config``; checks that its
    scheduler and executor support speculation. Built once the target is loaded and before
    the KV pool is sized: a draft's weights count in the memory the pool's budget is
    measured after, and its own cache shares that budget (:func:`kv_cache_blocks`)."""
    config = engine.args.speculative_config
    if config is None:
        return None
    for seam, flag in (
        (scheduler_cls, "supports_speculation"),
        (engine.executor, "verifies_drafts"),
    ):
        if not getattr(seam, flag):
            name = seam.__name__ if isinstance(seam, type) else type(seam).__name__
            raise ConfigError(f"speculative decoding needs a {name} with {flag}; this one has not")
    context = ProposerContext(
        engine.args,
        engine.resolved,
        engine.plugins,
        engine.vocab_size,
        engine.max_model_len,
        target=getattr(engine.executor, "runner", None),
    )
    return load_proposer(engine.plugins, config, context)


def kv_cache_blocks(executor: Executor, proposer: Proposer | None) -> int:
    """The blocks the executor's budget holds: with a proposer that keeps a cache of its
    own (``bytes_per_block() = p``), the target's share is ``t / (t + p)`` of the budget
    (``t``: the target's bytes per block), so both caches fit in it."""
    extra = proposer.bytes_per_block() if proposer is not None else 0
    # Only when nonzero: an executor written before the argument existed still works.
    return executor.available_blocks(extra) if extra else executor.available_blocks()


def build_speculator(
    engine: LLMEngine, proposer: Proposer | None, num_blocks: int
) -> Speculator | None:
    """The engine's speculator over ``proposer`` (None: no speculation), with the
    proposer's cache allocated for the pool's ``num_blocks`` blocks."""
    if proposer is None:
        return None
    config = proposer.config
    proposer.initialize_cache(num_blocks, engine.args.block_size)
    logger.info(
        "speculative decoding: %s, %d tokens per step; verification steps (1 + k tokens "
        "per sequence) run compiled where the platform's graph runner covers them (the "
        "CPU's verification libraries), else eagerly (CUDA graphs cover one token a sequence)",
        config.method,
        config.num_speculative_tokens,
    )
    return Speculator(proposer)
