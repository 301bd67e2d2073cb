"""Prometheus metrics, named after vLLM's (``vllm:`` becomes ``tessellm:``).

Engine gauges and counters are read from the engine thread's latest stats snapshot at
scrape time; request latencies are observed as streams finish. Each app has its own
registry, so several servers can live in one process (tests) without clashing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tessellm.engine.async_engine import AsyncLLMEngine
from tessellm.outputs import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# (stats key, metric name without prefix, help, kind)
ENGINE_METRICS = [
    ("num_running", "num_requests_running", "Sequences in the running batch.", "gauge"),
    ("num_waiting", "num_requests_waiting", "Sequences waiting to be scheduled.", "gauge"),
    ("kv_cache_usage", "kv_cache_usage_perc", "Fraction of KV cache blocks in use.", "gauge"),
    ("num_blocks", "num_kv_cache_blocks", "KV cache blocks in the pool.", "gauge"),
    (
        "batched_seqs_max",
        "batched_seqs_max",
        "Most sequences the engine has run in one step since it started.",
        "gauge",
    ),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens of requests added.", "counter"),
    ("generation_tokens", "generation_tokens", "Tokens generated.", "counter"),
    ("steps", "engine_steps", "Engine steps run.", "counter"),
    ("num_preemptions", "num_preemptions", "Sequences preempted for lack of blocks.", "counter"),
    (
        "prefix_cache_queried_tokens",
        "prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache.",
        "counter",
    ),
    (
        "prefix_cache_hit_tokens",
        "prefix_cache_hits",
        "Prompt tokens found in the prefix cache.",
        "counter",
    ),
    # vLLM's names for speculative decoding's counters (present when it is on).
    (
        "spec_decode_num_drafts",
        "spec_decode_num_drafts",
        "Request steps that carried speculative drafts.",
        "counter",
    ),
    (
        "spec_decode_num_draft_tokens",
        "spec_decode_num_draft_tokens",
        "Speculative draft tokens proposed.",
        "counter",
    ),
    (
        "spec_decode_num_accepted_tokens",
        "spec_decode_num_accepted_tokens",
        "Speculative draft tokens the target accepted.",
        "counter",
    ),
    (
        "spec_decode_proposer_seconds",
        "spec_decode_proposer_seconds",
        "Time spent proposing drafts.",
        "counter",
    ),
]


class EngineStatsCollector(Collector):
    def __init__(self, engine: AsyncLLMEngine, prefix: str) -> None:
        self.engine = engine
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats
        for key, name, help_text, kind in ENGINE_METRICS:
            if key not in stats:
                continue
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(f"{self.prefix}{name}", help_text, value=float(stats[key]))


class ServerMetrics:
    PREFIX = "tessellm:"

    def __init__(self, engine: AsyncLLMEngine) -> None:
        p = self.PREFIX
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            f"{p}http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_success = Counter(
            f"{p}request_success",
            "Finished completions by finish reason.",
            ["finish_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            f"{p}time_to_first_token_seconds",
            "Seconds from arrival to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            f"{p}time_per_output_token_seconds",
            "Mean seconds between output tokens after the first, per completion.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Seconds from arrival to the last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(EngineStatsCollector(engine, p))
        replica_collector = getattr(engine, "replica_collector", None)  # data parallelism
        if replica_collector is not None:
            self.registry.register(replica_collector(p))


class RequestTimer:
    """Observes one HTTP request's latencies from the outputs it receives."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.first_token: float | None = None
        self.first_token_counts: dict[tuple[str, int], int] = {}
        self.finished: set[tuple[str, int]] = set()

    def observe(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            for comp in out.outputs:
                key = (out.request_id, comp.index)
                if comp.token_ids and key not in self.first_token_counts:
                    self.first_token_counts[key] = len(comp.token_ids)
                    if self.first_token is None:
                        self.first_token = now
                        self.metrics.time_to_first_token.observe(now - self.start)
                if comp.finish_reason is not None and key not in self.finished:
                    self.finished.add(key)
                    self._finished(comp, key, now)

    def _finished(self, comp: Any, key: tuple[str, int], now: float) -> None:
        self.metrics.request_success.labels(comp.finish_reason).inc()
        self.metrics.e2e_latency.observe(now - self.start)
        extra = len(comp.token_ids) - self.first_token_counts.get(key, len(comp.token_ids))
        if extra > 0 and self.first_token is not None:
            self.metrics.time_per_output_token.observe((now - self.first_token) / extra)
