"""Building the engine a benchmark measures, its workload, and freeing it for baselines."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from typing import Any

from tessellm.bench.workload import BenchRequest, LengthRange, make_workload, usable_token_ids
from tessellm.config import EngineArgs
from tessellm.errors import ConfigError


@dataclass
class EngineOptions:
    """The engine arguments a bench command exposes, plus ``key=value`` extras."""

    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    quantization: str | None = None
    attention_backend: str | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def engine_args(self) -> EngineArgs:
        kwargs = {k: v for k, v in vars(self).items() if k != "extra"}
        kwargs.update(self.extra)
        return EngineArgs.from_kwargs(**kwargs)


def parse_engine_args(pairs: list[str] | None) -> dict[str, Any]:
    """``["max_num_seqs=64", "enforce_eager=true"]`` → typed values (JSON, else string)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--engine-arg expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip().replace("-", "_")] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip().replace("-", "_")] = raw
    return out


def build_engine(options: EngineOptions):
    import os

    from tessellm.engine.llm_engine import LLMEngine

    # A benchmark measures the compiled CPU decode step from its first request: missing
    # libraries are built before it starts, not in the background (docs/cpu.md).
    os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")
    return LLMEngine(options.engine_args())


def engine_workload(
    engine: Any, num_prompts: int, input_len: LengthRange, output_len: LengthRange, seed: int
) -> list[BenchRequest]:
    tokenizer = engine.tokenizer
    vocab = min(len(tokenizer), int(getattr(engine.model_config, "vocab_size", 0) or 1 << 30))
    ids = usable_token_ids(vocab, getattr(tokenizer, "all_special_ids", []))
    needed = input_len.high + output_len.high
    if needed > engine.max_model_len:
        raise ConfigError(
            f"input + output lengths reach {needed} tokens; the engine's max_model_len is "
            f"{engine.max_model_len}"
        )
    return make_workload(num_prompts, input_len, output_len, ids, seed)


def describe_engine(engine: Any) -> dict[str, str]:
    info = dict(engine.describe())
    info["model_path"] = str(engine.resolved.path)
    info["model_format"] = engine.resolved.format_name
    info["startup_s"] = f"{engine.startup_seconds:.1f}"
    return info  # the executor's describe() names the quantization method


def speculative_metrics(engine: Any) -> dict[str, float]:
    """Speculative decoding's acceptance and proposer cost, when it is on (else empty)."""
    stats = engine.stats()
    keys = (
        "spec_decode_acceptance_rate",
        "spec_decode_mean_accepted_length",
        "spec_decode_proposer_ms_per_step",
    )
    return {key: round(float(stats[key]), 4) for key in keys if key in stats}


def release_engine(engine: Any) -> None:
    """Free the engine's model and KV cache before a baseline loads its own copy."""
    import torch

    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def greedy_params(max_tokens: int):
    from tessellm.sampling_params import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_requests(engine: Any, requests: list[BenchRequest], bar: Any = None) -> dict[str, float]:
    """Submit all ``requests`` at once and step until every one finishes; time it."""
    start = time.perf_counter()
    ids = []
    for i, req in enumerate(requests):
        ids.append(engine.add_request(f"b{i}", req.prompt_token_ids, greedy_params(req.output_len)))
    generated = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
                if bar is not None:
                    bar.update(1)
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "output_tokens": generated}
