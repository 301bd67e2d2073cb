"""``tessellm bench perplexity``: how much a quantization method costs in accuracy.

The text is cut into windows of ``window`` tokens; every token of a window but the first
is scored by the model given the tokens before it in that window (prompt logprobs of a
one-token request), and the perplexity is ``exp(mean negative log-likelihood)`` over all
scored tokens. Each method runs on the same tokens in one invocation, the first one named
being the baseline the others are compared with (usually ``none``: the checkpoint's
weights dense, or dequantized for a GGUF file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from tessellm.bench.engine_run import EngineOptions, build_engine, describe_engine, release_engine
from tessellm.bench.report import BenchReport
from tessellm.errors import ConfigError

DEFAULT_TEXT = "perplexity.txt"  # shipped in tessellm/bench/data


def default_text() -> str:
    return resources.files("tessellm.bench").joinpath("data", DEFAULT_TEXT).read_text("utf-8")


@dataclass
class PerplexitySettings:
    methods: list[str]  # quantization methods, the first the baseline ("auto": the default)
    window: int = 256
    text_file: str | None = None
    max_windows: int | None = None


@dataclass
class PerplexityResult:
    perplexity: float
    scored_tokens: int
    windows: int


def windows_of(token_ids: list[int], window: int, max_windows: int | None) -> list[list[int]]:
    """Consecutive windows; a last one shorter than two tokens scores nothing and is dropped."""
    if window < 2:
        raise ConfigError("the perplexity window must hold at least 2 tokens")
    pieces = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    pieces = [p for p in pieces if len(p) >= 2]
    return pieces[:max_windows] if max_windows else pieces


def score(engine, windows: list[list[int]]) -> PerplexityResult:
    """Negative log-likelihood of every token after the first of each window."""
    from tessellm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    for i, ids in enumerate(windows):
        engine.add_request(f"ppl{i}", ids, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    nll, count = 0.0, 0
    for i, ids in enumerate(windows):
        entries = outputs[f"ppl{i}"].prompt_logprobs or []
        for token, entry in zip(ids[1:], entries[1:], strict=True):
            if entry is None or token not in entry:
                raise RuntimeError(f"window {i}: no logprob for prompt token {token}")
            nll -= entry[token].logprob
            count += 1
    return PerplexityResult(math.exp(nll / count), count, len(windows))


def run_perplexity(options: EngineOptions, settings: PerplexitySettings) -> BenchReport:
    text = Path(settings.text_file).read_text("utf-8") if settings.text_file else default_text()
    report = BenchReport(
        "perplexity",
        {
            "model": options.model,
            "dtype": options.dtype,
            "window": settings.window,
            "text": settings.text_file or f"tessellm/bench/data/{DEFAULT_TEXT}",
            "methods": settings.methods,
        },
    )
    baseline: float | None = None
    for method in settings.methods:
        quantization = None if method == "auto" else method
        engine = build_engine(replace(options, quantization=quantization))
        try:
            if baseline is None:
                report.record_engine(describe_engine(engine))
            ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
            windows = windows_of(
                ids, min(settings.window, engine.max_model_len), settings.max_windows
            )
            chosen = engine.describe().get("quantization", method)
            result = score(engine, windows)
        finally:
            release_engine(engine)
        if baseline is None:
            baseline = result.perplexity
        metrics = {
            "quantization": chosen,
            "perplexity": round(result.perplexity, 4),
            "vs_first_pct": round(100 * (result.perplexity / baseline - 1), 2),
            "scored_tokens": result.scored_tokens,
            "windows": result.windows,
        }
        report.add(f"tessellm[{method}]", metrics)
    return report
