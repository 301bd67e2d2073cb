"""Where a slow first token waited: each bench serve run's slowest requests beside the
engine steps that ran between their send and their first token.

Needs the server's step log (``TESSELLM_STEP_LOG`` with ``TESSELLM_STEP_LOG_MS=0``, from
``bench/triton_compile_log/sitecustomize.py``) and ``tessellm bench serve --output-json``
files (their ``run_start_epoch_s`` places each request on the server's clock: same machine)::

    python bench/ttft_vs_steps.py STEPS_LOG RUN.json [RUN.json ...] [--worst 3]

A request that arrives during a step joins at the next one at the earliest; one that
misses several steps waited outside the engine (the HTTP layer, a command queue).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

STEP = re.compile(r"([\d.]+) step ([\d.]+)ms running=(\d+) waiting=(\d+) (.*)")


def read_steps(path: Path) -> list[tuple[float, float, str]]:
    """(start, end, what) of every logged step, epoch seconds."""
    steps = []
    for line in path.read_text().splitlines():
        if match := STEP.match(line):
            end, ms = float(match[1]), float(match[2])
            what = f"running={match[3]} waiting={match[4]} {match[5]}"
            steps.append((end - ms / 1000, end, what))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--worst", type=int, default=3)
    args = parser.parse_args()
    steps = read_steps(args.steps)
    for run in args.runs:
        data = json.loads(run.read_text())
        origin = data["settings"]["run_start_epoch_s"]
        requests = [r for r in data["requests"] if r["ok"]]
        requests.sort(key=lambda r: -r["ttft_ms"])
        print(f"{run.name}: slowest TTFTs {[round(r['ttft_ms']) for r in requests[:8]]} ms")
        for r in requests[: args.worst]:
            sent = origin + r["sent_s"]
            first = sent + r["ttft_ms"] / 1000
            print(f"  sent at {r['sent_s']:.3f} s, first token after {r['ttft_ms']:.0f} ms:")
            for start, end, what in steps:
                if end > sent - 0.05 and start < first + 0.02:
                    ms = (end - start) * 1000
                    print(f"    step {start - sent:+.3f}..{end - sent:+.3f} s ({ms:.0f} ms) {what}")


if __name__ == "__main__":
    main()
