"""``tessellm bench serve``: an async load of OpenAI completions against a running server.

Requests arrive as a Poisson process at ``request_rate`` per second (``inf``: all at
once), optionally capped at ``max_concurrency`` in flight, each a streamed completion.
Per request: TTFT (send → first token), TPOT (mean gap after the first token) and every
inter-token latency (ITL); over the run: request and output-token throughput.

The streams are read with ``httpx`` and ``json`` alone, as vLLM's benchmark reads them
with aiohttp: the ``openai`` client builds a pydantic object per chunk, and at ~3,700
tokens a second (64 req/s on an H100) that kept the client's one event loop busy (its
lag p99 284 ms, max 809): the client's queue, not the server's, was the TTFT tail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from tessellm.bench.report import BenchReport, progress
from tessellm.bench.workload import BenchRequest, LengthRange, make_workload, usable_token_ids


@dataclass
class ServeSettings:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None  # None: the first model the server lists
    api_key: str = "EMPTY"
    num_prompts: int = 64
    input_len: LengthRange = field(default_factory=lambda: LengthRange(32, 32))
    output_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    request_rate: float = math.inf
    max_concurrency: int | None = None
    vocab_size: int = 32000  # random prompt ids are drawn below this ...
    tokenizer: str | None = None  # ... or from this model's tokenizer, specials excluded
    text_prompts: bool = False  # send the prompts decoded to text (needs ``tokenizer``)
    ignore_eos: bool = True  # vLLM's extension; servers that refuse unknown fields lack it
    seed: int = 0
    timeout_s: float = 600.0


@dataclass(slots=True)
class RequestTiming:
    ok: bool
    sent: float = 0.0  # seconds after the run's start
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def record(self) -> dict[str, Any]:
        """This request in the report: when it was sent and what it took, so a percentile's
        outliers can be placed in the run (the first requests, or a burst)."""
        return {
            "sent_s": round(self.sent, 4),
            "ok": self.ok,
            "ttft_ms": round(self.ttft * 1e3, 3) if self.ok else None,
            "e2e_ms": round(self.e2e * 1e3, 3) if self.ok else None,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            **({"error": self.error} if self.error else {}),
        }


async def one_request(
    client: Any, model: str, req: BenchRequest, run_start: float, ignore_eos: bool = True
) -> RequestTiming:
    """One streamed completion, timed (``client``: an ``httpx.AsyncClient`` on the API's
    base URL; ``run_start``: the run's ``perf_counter`` origin)."""
    start = time.perf_counter()
    timing = RequestTiming(ok=False, sent=start - run_start, input_tokens=req.input_len)
    body: dict[str, Any] = {
        "model": model,
        "prompt": req.prompt_text if req.prompt_text is not None else req.prompt_token_ids,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    last = None
    chunks = 0
    try:
        async with client.stream("POST", "completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                timing.error = f"HTTP {response.status_code}: {_error_message(response.text)}"
                return timing
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    timing.error = f"stream error: {_error_message(data)}"
                    return timing
                choices = chunk.get("choices")
                if choices and choices[0].get("text"):
                    chunks += 1
                    if last is None:
                        timing.ttft = now - start
                    else:
                        timing.itls.append(now - last)
                    last = now
                if usage := chunk.get("usage"):
                    timing.output_tokens = usage.get("completion_tokens") or 0
                    # The server's own count: a text prompt's tokenization is the server's.
                    timing.input_tokens = usage.get("prompt_tokens") or timing.input_tokens
    except Exception as exc:  # a failed request is counted, not fatal to the run
        timing.error = f"{type(exc).__name__}: {exc}"
        return timing
    timing.e2e = time.perf_counter() - start
    timing.output_tokens = timing.output_tokens or chunks
    timing.ok = last is not None
    if not timing.ok:
        timing.error = "no tokens streamed"
    return timing


def _error_message(text: str) -> str:
    """An OpenAI-shaped error's message, or the start of whatever the server said."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _percentiles(values: list[float], scale: float = 1e3) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * scale

    return {"p50": pct(0.5), "p99": pct(0.99), "mean": statistics.fmean(values) * scale}


def summarize(timings: list[RequestTiming], elapsed: float) -> dict[str, float | int | None]:
    done = [t for t in timings if t.ok]
    out_tokens = sum(t.output_tokens for t in done)
    metrics: dict[str, float | int | None] = {
        "completed": len(done),
        "failed": len(timings) - len(done),
        "elapsed_s": round(elapsed, 3),
        "req_s": len(done) / elapsed,
        "output_tok_s": out_tokens / elapsed,
        "total_tok_s": (out_tokens + sum(t.input_tokens for t in done)) / elapsed,
    }
    series = {
        "ttft": [t.ttft for t in done],
        "tpot": [t.tpot for t in done if t.tpot is not None],
        "itl": [x for t in done for x in t.itls],
    }
    for name, values in series.items():
        stats = _percentiles(values)
        metrics[f"{name}_p50_ms"] = stats["p50"]
        metrics[f"{name}_p99_ms"] = stats["p99"]
    return metrics


LAG_PROBE_S = 0.005


async def _watch_loop_lag(lags: list[float]) -> None:
    """Append how late each ``LAG_PROBE_S`` sleep of this event loop wakes (seconds)."""
    lags.append(0.0)
    while True:
        before = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_S)
        lags.append(max(0.0, time.perf_counter() - before - LAG_PROBE_S))


async def _first_model(client: Any) -> str:
    response = await client.get("models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def _run(settings: ServeSettings, requests: list[BenchRequest]) -> BenchReport:
    import httpx

    client = httpx.AsyncClient(
        base_url=settings.base_url.rstrip("/") + "/",
        headers={"Authorization": f"Bearer {settings.api_key}"},
        timeout=settings.timeout_s,
        # One connection per request in flight, as the OpenAI client's pool allows.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )
    model = settings.model or await _first_model(client)
    report = BenchReport(
        "serve",
        {
            "base_url": settings.base_url,
            "model": model,
            "num_prompts": len(requests),
            "input_len": str(settings.input_len),
            "output_len": str(settings.output_len),
            "request_rate": str(settings.request_rate),
            "max_concurrency": settings.max_concurrency,
        },
    )
    report.machine["device"] = f"server at {settings.base_url}"
    limit = asyncio.Semaphore(settings.max_concurrency or len(requests) or 1)
    rng = random.Random(settings.seed)
    bar = progress(len(requests), "serve")

    async def limited(req: BenchRequest) -> RequestTiming:
        async with limit:
            result = await one_request(client, model, req, start, settings.ignore_eos)
        bar.update(1)
        return result

    lags: list[float] = []
    watch = asyncio.create_task(_watch_loop_lag(lags))
    start = time.perf_counter()
    # sent_s + this epoch places a request against server-side logs (step times, /metrics).
    report.settings["run_start_epoch_s"] = round(time.time(), 4)
    tasks = []
    for req in requests:
        tasks.append(asyncio.create_task(limited(req)))
        if math.isfinite(settings.request_rate) and settings.request_rate > 0:
            await asyncio.sleep(rng.expovariate(settings.request_rate))
    timings = await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    watch.cancel()
    bar.close()
    await client.aclose()
    metrics = summarize(timings, elapsed)
    # The client's own event loop, late by this much: a client too busy reading streams
    # delays sends and reads, and every latency above includes that.
    lag = _percentiles(lags)
    metrics["client_lag_p99_ms"], metrics["client_lag_max_ms"] = lag["p99"], max(lags) * 1e3
    report.add("tessellm-server", metrics)
    report.requests = [t.record() for t in timings]
    errors = sorted({t.error for t in timings if not t.ok})
    if errors:
        report.rows[-1].note = "errors: " + "; ".join(errors[:3])
    return report


def _tokenizer(name: str):
    from tessellm import model_loader as ml
    from tessellm.config import EngineArgs
    from tessellm.plugins import get_plugins

    plugins = get_plugins()
    resolved = ml.resolve_model(plugins, name, EngineArgs().cache_dir)
    return ml.weight_format(plugins, resolved).load_tokenizer(resolved.path)


def text_of_length(tokenizer: Any, token_ids: list[int]) -> str:
    """Text that the tokenizer encodes to about ``len(token_ids)`` tokens.

    Random ids decoded do not encode back to as many tokens: Llama 3's byte-level pieces
    out of context re-encode to ~7 times as many (256 ids gave 1,839 tokens). So the
    decoded text is encoded, cut to the wanted count and decoded again, a few times
    (each round's cut can merge differently at the new end).
    """
    want = len(token_ids)
    text = tokenizer.decode(token_ids)
    for _ in range(4):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= want:
            break
        text = tokenizer.decode(ids[:want])
    return text


def prompt_token_ids(settings: ServeSettings) -> list[int]:
    if settings.tokenizer is None:
        # Low ids of most vocabularies hold special and byte tokens; skip them.
        return usable_token_ids(settings.vocab_size, range(min(1000, settings.vocab_size - 1)))
    tokenizer = _tokenizer(settings.tokenizer)
    return usable_token_ids(len(tokenizer), tokenizer.all_special_ids)


def run_serve(settings: ServeSettings) -> BenchReport:
    from tessellm.errors import ConfigError

    if settings.text_prompts and settings.tokenizer is None:
        raise ConfigError("--text-prompts needs --tokenizer (the model whose tokens to decode)")
    ids = prompt_token_ids(settings)
    requests = make_workload(
        settings.num_prompts, settings.input_len, settings.output_len, ids, settings.seed
    )
    if settings.text_prompts:
        tokenizer = _tokenizer(settings.tokenizer)
        requests = [
            dataclasses.replace(req, prompt_text=text_of_length(tokenizer, req.prompt_token_ids))
            for req in requests
        ]
    return asyncio.run(_run(settings, requests))
