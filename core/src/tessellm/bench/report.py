"""Benchmark results: one row per system (tessellm and its baselines), a table, JSON.

Every report carries the machine it ran on and the settings it used, so a figure can be
copied into ``bench/RESULTS.md`` together with the baseline measured in the same run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

Metric = float | int | str | None


@dataclass(slots=True)
class ResultRow:
    system: str  # "tessellm", "hf", "llama.cpp"
    metrics: dict[str, Metric]
    note: str = ""


@dataclass(slots=True)
class SkippedBaseline:
    system: str
    reason: str


@dataclass
class BenchReport:
    benchmark: str  # "throughput", "latency", "serve"
    settings: dict[str, Any]
    headline: str | None = None  # the metric compared across rows ("higher is better")
    rows: list[ResultRow] = field(default_factory=list)
    skipped: list[SkippedBaseline] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=lambda: machine_info())
    started: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    requests: list[dict[str, Any]] = field(default_factory=list)  # serve: one per request

    def record_engine(self, engine_info: dict[str, str]) -> None:
        """Keep the engine's description, and describe the machine by the device it chose."""
        self.settings["engine"] = engine_info
        self.machine = machine_info(engine_info.get("device", "cpu").split(":")[0])

    def add(self, system: str, metrics: dict[str, Metric], note: str = "") -> None:
        self.rows.append(ResultRow(system, metrics, note))

    def skip(self, system: str, reason: str) -> None:
        self.skipped.append(SkippedBaseline(system, reason))

    def ratios(self) -> dict[str, float]:
        """tessellm's headline metric over each baseline's (``"hf": 3.1`` means 3.1x)."""
        if self.headline is None:
            return {}
        ours = next((r for r in self.rows if r.system == "tessellm"), None)
        mine = ours.metrics.get(self.headline) if ours else None
        if not isinstance(mine, int | float):
            return {}
        out = {}
        for row in self.rows:
            theirs = row.metrics.get(self.headline)
            if row is not ours and isinstance(theirs, int | float) and theirs > 0:
                out[row.system] = round(mine / theirs, 3)
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratios"] = self.ratios()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render_table(self) -> str:
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row.metrics if k not in columns]
        header = ["system", *columns]
        body = [[row.system, *(_fmt(row.metrics.get(c)) for c in columns)] for row in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body, strict=True)]
        lines = [f"tessellm bench {self.benchmark}  ({self.started}, {self.machine['device']})"]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for cells in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
        for row in self.rows:
            if row.note:
                lines.append(f"  {row.system}: {row.note}")
        for system, ratio in self.ratios().items():
            lines.append(f"tessellm / {system} ({self.headline}): {ratio:.2f}x")
        for skipped in self.skipped:
            lines.append(f"skipped {skipped.system}: {skipped.reason}")
        return "\n".join(lines)


def _fmt(value: Metric) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device_type: str = "cpu") -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    if device_type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["device"] = info["gpu"]
    else:
        threads = torch.get_num_threads()
        info["device"] = f"{info['cpu']} ({threads} thread{'s' if threads != 1 else ''})"
    return info


def progress(total: int, desc: str, unit: str = "req"):
    """A tqdm bar on stderr (hidden when stderr is not a terminal), or a no-op."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass
