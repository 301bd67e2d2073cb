"""The pooling engine: embedding requests as one forward each, batched, nothing cached.

It shares the generation engine's model loading (sources, weight formats, platforms,
families) but none of its loop: a pooling request has no decode steps, so there is no
scheduler, no KV cache and no sampler. ``embed`` takes many prompts, orders them by length
(so a batch pads little), cuts batches of at most ``max_num_seqs`` prompts and
``max_num_batched_tokens`` padded tokens, runs one forward per batch and pools each
prompt's token states (``tessellm.engine.pooler``).

Which engine a model gets (``runs_pooling``): ``EngineArgs.runner`` as vLLM names it
(``"generate"``, ``"pooling"``), or with ``"auto"`` the checkpoint says: an encoder
architecture (``BertModel``), a bare decoder (``Qwen3Model``), or sentence-transformers
files with a ``Pooling`` module make it a pooling model.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine import pooler
from tessellm.engine.pooling_runner import PoolingRunner, pooling_model_class
from tessellm.errors import ConfigError, InvalidRequestError
from tessellm.interfaces.pooling import is_encoder_class
from tessellm.plugins import PluginSet, get_plugins
from tessellm.pooling_params import EmbeddingOutput, EmbeddingRequestOutput, PoolingParams

# Padded tokens per forward unless max_num_batched_tokens says otherwise (raised to the
# context length: a prompt is never split).
DEFAULT_TOKEN_BUDGET = 8192
RUNNERS = ("auto", "generate", "pooling")


def is_pooling_checkpoint(plugins: PluginSet, config: Any, path: Path) -> bool:
    """Whether the checkpoint is an embedding model (see the module docstring)."""
    if pooler.has_pooling_module(path):
        return True
    registration = plugins.get("models", ml.architecture_of(config))
    if registration is None:  # a bare decoder served by its causal LM's family
        return pooling_model_class(plugins, config) is not None
    return is_encoder_class(registration.load())


def runs_pooling(args: EngineArgs, plugins: PluginSet | None = None) -> bool:
    """Whether ``args`` asks for the pooling engine (resolving the model to read it)."""
    if args.runner not in RUNNERS:
        raise ConfigError(f"unknown runner {args.runner!r}: one of {', '.join(RUNNERS)}")
    if args.runner != "auto":
        return args.runner == "pooling"
    plugins = plugins or get_plugins()
    resolved = ml.resolve_model(plugins, args.model, args.cache_dir, args.revision)
    config = ml.weight_format(plugins, resolved).load_config(resolved.path)
    return is_pooling_checkpoint(plugins, config, resolved.path)


def check_generative(args: EngineArgs, plugins: PluginSet, config: Any, path: Path) -> None:
    """``ConfigError`` where the generation engine is given an embedding model (for
    ``LLMEngine``: without it an encoder fails later, with no clear reason)."""
    if args.runner == "pooling" or (
        args.runner == "auto" and is_pooling_checkpoint(plugins, config, path)
    ):
        raise ConfigError(
            f"{args.model} is an embedding model, which does not generate: use LLM.embed(), "
            "or serve it (`tessellm serve`) for POST /v1/embeddings"
        )


class PoolingEngine:
    def __init__(self, args: EngineArgs, plugins: PluginSet | None = None) -> None:
        start = time.monotonic()
        self.args = args
        plugins = plugins or get_plugins()
        self.resolved = ml.resolve_model(plugins, args.model, args.cache_dir, args.revision)
        fmt = ml.weight_format(plugins, self.resolved)
        self.model_config = fmt.load_config(self.resolved.path)
        tok_source = (
            self.resolved
            if args.tokenizer is None
            else ml.resolve_model(plugins, args.tokenizer, args.cache_dir)
        )
        self.tokenizer = ml.weight_format(plugins, tok_source).load_tokenizer(tok_source.path)
        self.runner = PoolingRunner(args, self.resolved, plugins)
        self.pooling = pooler.read_pooling_config(
            self.resolved.path, self.model_config, self.runner.default_pooling
        )
        self.max_model_len = ml.max_model_len_of(self.model_config, args.max_model_len)
        if args.max_model_len is None and self.pooling.max_seq_length:
            self.max_model_len = min(self.max_model_len, self.pooling.max_seq_length)
        budget = args.max_num_batched_tokens
        if budget is not None and budget < self.max_model_len:
            raise ConfigError(
                f"max_num_batched_tokens ({budget}) must be at least max_model_len "
                f"({self.max_model_len}) for an embedding model: a prompt runs in one forward"
            )
        self.token_budget = budget or max(DEFAULT_TOKEN_BUDGET, self.max_model_len)
        self.max_num_seqs = args.max_num_seqs
        vocab = ml.logits_width(self.model_config, self.tokenizer)
        self.max_token_id = min(vocab, len(self.tokenizer)) - 1
        width = int(ml.text_config(self.model_config).hidden_size)
        self.embedding_size = width * len(self.pooling.modes)
        self._ids = itertools.count()
        self.counters = {"prompt_tokens": 0, "steps": 0, "requests": 0, "batched_seqs_max": 0}
        self.startup_seconds = time.monotonic() - start

    # -- requests ------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return list(self.tokenizer.encode(prompt))

    def validate_tokens(self, token_ids: Sequence[Any]) -> None:
        if not token_ids:
            raise InvalidRequestError("the input is empty")
        top = self.max_token_id
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= top for t in token_ids
        ):
            raise InvalidRequestError(f"input token ids must be integers in [0, {top}]")
        if len(token_ids) > self.max_model_len:
            raise InvalidRequestError(
                f"the input has {len(token_ids)} tokens; this model's maximum context length "
                f"is {self.max_model_len} tokens"
            )

    def prepare(self, prompt: str | Sequence[int]) -> list[int]:
        """The token ids of one input (text is tokenized), checked against the model."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the input is empty")
            ids = self.tokenize(prompt)
        else:
            ids = list(prompt)
        self.validate_tokens(ids)
        return ids

    def validate_params(self, params: PoolingParams) -> None:
        params.validate()
        pooler.check_dimensions(self.pooling, params.dimensions, self.embedding_size)

    # -- running -------------------------------------------------------------------------
    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of prompts per forward: longest first, each batch within the limits."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        out: list[list[int]] = []
        for i in order:
            # Sorted longest first, a batch's first prompt sets its padded length.
            current = out[-1] if out else None
            if (
                current is None
                or len(current) >= self.max_num_seqs
                or (len(current) + 1) * lengths[current[0]] > self.token_budget
            ):
                out.append([i])
            else:
                current.append(i)
        return out

    def embed_token_ids(
        self, prompts: Sequence[list[int]], params: Sequence[PoolingParams]
    ) -> list[torch.Tensor]:
        """One float32 vector (on the CPU) per prompt of already checked token ids."""
        for p in {id(p): p for p in params}.values():
            self.validate_params(p)
        results: list[torch.Tensor | None] = [None] * len(prompts)
        for batch in self.batches([len(p) for p in prompts]):
            ids = [prompts[i] for i in batch]
            hidden = self.runner.forward(ids)
            pooled = pooler.pool(hidden, [len(p) for p in ids], self.pooling.modes)
            for row, i in enumerate(batch):
                normalize = params[i].normalize
                normalize = self.pooling.normalize if normalize is None else normalize
                results[i] = pooler.finish(pooled[row], params[i].dimensions, normalize).cpu()
            self.counters["steps"] += 1
            self.counters["batched_seqs_max"] = max(self.counters["batched_seqs_max"], len(batch))
        self.counters["prompt_tokens"] += sum(len(p) for p in prompts)
        self.counters["requests"] += len(prompts)
        return [r for r in results if r is not None]

    def embed(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: PoolingParams | Sequence[PoolingParams] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """``LLM.embed``'s work: inputs checked first (any invalid one raises before
        anything runs), then embedded together."""
        params = params or PoolingParams()
        params_list = [params] * len(prompts) if isinstance(params, PoolingParams) else list(params)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("give one PoolingParams, or one per prompt")
        token_ids = [self.prepare(p) for p in prompts]
        vectors = self.embed_token_ids(token_ids, params_list)
        return [
            EmbeddingRequestOutput(str(next(self._ids)), ids, EmbeddingOutput(vec.tolist()))
            for ids, vec in zip(token_ids, vectors, strict=True)
        ]

    def stats(self) -> dict[str, float]:
        return dict(self.counters)

    def describe(self) -> dict[str, str]:
        runner = self.runner
        return {
            "platform": runner.platform_choice.explain("platform"),
            "attention": "dense over the batch, no KV cache",
            "dtype": str(runner.dtype).removeprefix("torch."),
            "device": str(runner.device),
            "quantization": runner.quantization,
            "pooling": f"{'+'.join(self.pooling.modes)} ({self.pooling.source})"
            + (", normalized" if self.pooling.normalize else ""),
        }

    def shutdown(self) -> None:
        pass


def embed_prompts(
    engine: object,
    prompts: Sequence[str | Sequence[int]],
    params: PoolingParams | Sequence[PoolingParams] | None,
) -> list[EmbeddingRequestOutput]:
    """``LLM.embed``: ``InvalidRequestError`` unless ``engine`` is a pooling engine."""
    if not isinstance(engine, PoolingEngine):
        raise InvalidRequestError(
            "embed needs an embedding model; this is a generative model (runner='pooling' "
            "runs a decoder as one, pooling its last token)"
        )
    return engine.embed(prompts, params)


def refuse_generation(engine: object) -> None:
    """``InvalidRequestError`` for generating with an embedding model."""
    if isinstance(engine, PoolingEngine):
        raise InvalidRequestError(
            f"{engine.args.model} runs as an embedding model: use embed(), not generate()/chat()"
        )
