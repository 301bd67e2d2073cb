"""The speculative-decoding seam: proposers that guess a running request's next tokens.

A proposer (``register_speculative_proposers``; ``ngram`` and ``draft_model`` are
first-party plugins) is chosen by ``speculative_config`` (vLLM's name and fields). Before a
step is scheduled the engine asks it for up to ``num_speculative_tokens`` draft tokens for
each request that is decoding. The scheduler then gives such a request ``1 + k`` tokens of
the step (its last token and the drafts): the target model scores them all in one forward
pass, and the sampler keeps the longest prefix of drafts the target agrees with, plus one
token of its own. Greedy requests keep a draft while it is the target's argmax; sampled
requests accept draft ``x`` with probability ``p(x)`` and, at the first rejection, draw
from ``p`` with ``x`` removed — the rule of Leviathan et al. for a proposal that puts all
its mass on ``x``, which makes the output distribution exactly the target's. So a proposer
only returns tokens, never probabilities, and nothing it returns can change an output:
it changes how many target steps the output takes.

KV written for rejected drafts is left behind the request's computed tokens: the next step
overwrites it, and a block is published to the prefix cache only once its tokens are
accepted.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from tessellm.errors import ConfigError

if TYPE_CHECKING:
    from tessellm.config import EngineArgs
    from tessellm.engine.model_runner import ModelRunner
    from tessellm.interfaces.request import Request
    from tessellm.model_loader import ResolvedModel
    from tessellm.plugins import PluginSet

# Proposing for many sequences gains little once a step is bound by compute rather than by
# reading the weights; vLLM leaves this off by default, tessellm turns speculation down.
DEFAULT_DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """``speculative_config``, with vLLM's field names.

    ``method``: the proposer's registered name (``"ngram"``, ``"draft_model"``, ...).
    ``num_speculative_tokens``: drafts per request per step (``k``). ``prompt_lookup_max``
    / ``prompt_lookup_min``: n-gram lengths the ``ngram`` proposer matches. ``model``: the
    draft model (``draft_model``), with its ``quantization``. ``disable_by_batch_size``: no
    drafts in a step while more requests than this are running (``0``: never disabled).
    """

    method: str
    num_speculative_tokens: int = 3
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    model: str | None = None
    quantization: str | None = None
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError("speculative_config needs a 'method' (e.g. \"ngram\")")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ConfigError("num_speculative_tokens must be in [1, 32]")
        lookup_max = self.prompt_lookup_max or 0
        lookup_min = self.prompt_lookup_min or 0
        if (
            lookup_max < 0
            or lookup_min < 0
            or (lookup_min and lookup_max and lookup_min > lookup_max)
        ):
            raise ConfigError("need 0 < prompt_lookup_min <= prompt_lookup_max")
        if self.disable_by_batch_size < 0:
            raise ConfigError("disable_by_batch_size must be at least 0")

    @classmethod
    def parse(
        cls, value: SpeculativeConfig | Mapping[str, Any] | str | None
    ) -> SpeculativeConfig | None:
        """From what a user passes: this class, a dict, or JSON text (the CLI's
        ``--speculative-config``). ``ConfigError`` names an unknown or mistyped field."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"speculative_config is not valid JSON: {exc.msg}") from None
        if not isinstance(value, Mapping):
            raise ConfigError("speculative_config must be a JSON object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown speculative_config field(s): {', '.join(unknown)}; known: "
                + ", ".join(known)
            )
        if "method" not in value:
            raise ConfigError("speculative_config needs a 'method' (e.g. \"ngram\")")
        for name, item in value.items():
            wanted = int if name not in ("method", "model", "quantization") else str
            if item is not None and (not isinstance(item, wanted) or isinstance(item, bool)):
                kind = "an integer" if wanted is int else "a string"
                raise ConfigError(f"speculative_config.{name} must be {kind}")
        return cls(**value)


@dataclass(slots=True)
class ProposerContext:
    """What a proposer is built with: the target's engine arguments, model and plugins.

    ``target``: the target's ``ModelRunner`` where it runs in the engine's process (the
    ``uniproc`` executor), else None. A proposer that reads the target's hidden states or
    shares its embedding and LM head (EAGLE) needs it: it sets the runner's
    ``hidden_states_sink`` (``interfaces.model.HiddenStatesSource`` says what it gets)."""

    args: EngineArgs
    resolved: ResolvedModel
    plugins: PluginSet
    vocab_size: int
    max_model_len: int
    target: ModelRunner | None = None


class Proposer(ABC):
    """Proposes draft tokens. Constructed as ``cls(config, context)`` by the engine."""

    def __init__(self, config: SpeculativeConfig, context: ProposerContext) -> None:
        self.config = config
        self.context = context

    @abstractmethod
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """At most ``max_drafts[i]`` draft tokens to follow ``requests[i]``'s tokens
        (``prompt_token_ids + output_token_ids``, all known). An empty list: no guess.
        Runs on the engine's step loop, between steps: it should take a small fraction of
        a step."""

    def bytes_per_block(self) -> int:
        """KV cache bytes the proposer's own cache needs per block of the target's cache
        (0 without one). Asked once the proposer is built, before the pool is sized: the
        pool gets ``t / (t + bytes_per_block())`` of the KV budget (``t``: the target's
        bytes per block), so that both caches fit in it."""
        return 0

    def initialize_cache(self, num_blocks: int, block_size: int) -> None:  # noqa: B027
        """Allocate the proposer's own KV cache: ``num_blocks`` blocks of ``block_size``
        tokens, indexed by the target's block ids (a request's ``block_ids`` hold its
        draft KV too). Called once, after the target's cache. Default: nothing to do."""

    def finished(self, request_ids: Sequence[str]) -> None:  # noqa: B027
        """These requests are done or were preempted (their blocks freed): forget any
        state kept for them. Default: nothing kept."""

    def describe(self) -> dict[str, str]:
        """What it proposes with, for logs and benchmark reports."""
        return {"speculative_method": self.config.method}


class BatchedProposer(Proposer):
    """A proposer that runs a model (a draft model, an EAGLE head) over batches of requests.

    ``propose`` asks ``draft_limit`` how many drafts each request can take, then hands the
    requests that can take some to ``propose_batch``, in order, at most ``max_batch`` at a
    time: ``max_num_seqs``, or ``disable_by_batch_size`` where that is smaller (the engine
    asks for no drafts while more requests than that run). A batch's slot ``i`` is stable
    within one ``propose_batch`` call, so per-slot resources (scratch KV blocks past the
    target's ids) can be sized ``max_batch`` times one slot's share."""

    @property
    def max_batch(self) -> int:
        """The most requests one ``propose_batch`` call gets."""
        limit = self.config.disable_by_batch_size
        max_num_seqs = self.context.args.max_num_seqs
        return min(max_num_seqs, limit) if limit else max_num_seqs

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        chosen: list[tuple[int, int]] = []  # (index in requests, drafts it can take)
        for index, (request, wanted) in enumerate(zip(requests, max_drafts, strict=False)):
            limit = self.draft_limit(request, wanted)
            if limit > 0:
                chosen.append((index, limit))
        max_batch = self.max_batch
        for first in range(0, len(chosen), max_batch):
            batch = chosen[first : first + max_batch]
            batch_drafts = self.propose_batch(
                [requests[index] for index, _ in batch], [limit for _, limit in batch]
            )
            for (index, _), row in zip(batch, batch_drafts, strict=True):
                drafts[index] = row
        return drafts

    def draft_limit(self, request: Request, wanted: int) -> int:
        """How many drafts ``request`` can take this step, at most ``wanted`` (what the
        engine asks for); 0 or less leaves it out of every batch. Override to keep drafts
        within the model's length or the request's KV blocks. Default: ``wanted``."""
        return wanted

    @abstractmethod
    def propose_batch(self, requests: Sequence[Request], limits: Sequence[int]) -> list[list[int]]:
        """Drafts for one batch: at most ``limits[i]`` (at least 1) tokens for
        ``requests[i]``, one list per request in order; ``len(requests) <= max_batch``."""
