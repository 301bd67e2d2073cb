"""What a server of several models measures: each engine's stats labelled by model, each
model's loads, unloads and memory estimate."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tessellm.server.metrics import ENGINE_METRICS, ServerMetrics

if TYPE_CHECKING:
    from tessellm.server.router import ModelRouter


class _NoEngineStats:
    """ServerMetrics' own engine collector reads one engine; the router's are labelled."""

    stats: dict[str, float] = {}


class RouterMetrics(ServerMetrics):
    """The server's registry: HTTP and latency metrics as one model's server has them,
    engine metrics with a ``model`` label, and the models' state."""

    def __init__(self, router: ModelRouter) -> None:
        super().__init__(_NoEngineStats())  # type: ignore[arg-type]
        self.registry.register(RouterCollector(router, self.PREFIX))


class RouterCollector(Collector):
    def __init__(self, router: ModelRouter, prefix: str) -> None:
        self.router = router
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        p = self.prefix
        entries = self.router.entries
        loaded = [e for e in entries if e.ctx is not None]
        for key, name, help_text, kind in ENGINE_METRICS:
            family_cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_cls(f"{p}{name}", help_text, labels=["model"])
            found = False
            for e in loaded:
                stats = e.ctx.engine.stats  # type: ignore[union-attr]
                if key in stats:
                    family.add_metric([e.name], float(stats[key]))
                    found = True
            if found:
                yield family
        per_model: list[tuple[str, str, str, Any]] = [
            ("model_loaded", "Whether the model is loaded (1) or not (0).", "gauge",
             lambda e: float(e.ctx is not None)),
            ("model_requests_in_flight", "Requests routed to the model and not yet answered "
             "(those waiting for it to load too).", "gauge", lambda e: float(e.leases)),
            ("model_memory_bytes", "Estimated bytes of the model's weights and KV cache (kept "
             "after it is unloaded).", "gauge", lambda e: float(e.bytes)),
            ("model_load_seconds", "Seconds the model's latest load took.", "gauge",
             lambda e: e.load_seconds),
            ("model_loads", "Times the model was loaded.", "counter", lambda e: float(e.loads)),
            ("model_unloads", "Times the model was unloaded to make room.", "counter",
             lambda e: float(e.unloads)),
        ]  # fmt: skip
        for name, help_text, kind, value in per_model:
            family_cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_cls(f"{p}{name}", help_text, labels=["model"])
            for e in entries:
                family.add_metric([e.name], value(e))
            yield family
