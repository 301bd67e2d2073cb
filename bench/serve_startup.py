"""Time from starting ``tessellm serve`` to its first healthy ``/health`` and to its first
completed request, cold (an empty cache directory: the default model's GGUF is converted
again and no compiled decode step exists) and warm (the same directory again, after a
run that built the compiled steps), issue 16's start-up target (here: ≤ 20 s cold,
≤ 10 s warm for the default model).

Each round starts the server as a user would (``tessellm serve``, defaults, its own
``TESSELLM_CACHE``), polls ``/health`` every 50 ms from the moment the process starts,
then sends one completion (8 tokens) and stops the server. Cold rounds each get a new
empty directory; warm rounds share one prepared directory. Prints one JSON line per round
and a summary of medians.

    python bench/serve_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tessellm.config import DEFAULT_MODEL


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_round(
    cache: Path, env_extra: dict[str, str], max_tokens: int, model: str, serve_args: list[str]
) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TESSELLM_CACHE": str(cache), **env_extra}
    cmd = [shutil.which("tessellm") or "tessellm", "serve", model, "--port", str(port), *serve_args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        healthy = None
        while healthy is None:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    healthy = time.perf_counter() - start
            except httpx.TransportError:
                time.sleep(0.05)
        body = {"model": model, "prompt": "The capital of France is",
                "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
        response = httpx.post(url + "/v1/completions", json=body, timeout=600)
        response.raise_for_status()
        completed = time.perf_counter() - start
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"healthy_s": round(healthy, 2), "first_completion_s": round(completed, 2)}


def prepare_warm(cache: Path, model: str, serve_args: list[str]) -> None:
    """One serve whose compiled steps are built before it serves (a user's first day)."""
    one_round(cache, {"TESSELLM_CPU_COMPILE": "wait"}, 8, model, serve_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--serve-arg", action="append", default=[], help="passed to serve")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="tessellm-startup-") as tmp:
        warm_cache = Path(tmp) / "warm"
        prepare_warm(warm_cache, args.model, args.serve_arg)
        for k in range(args.rounds):
            # Alternated, so that a change in the machine's load shows in both.
            cold_cache = Path(tmp) / f"cold{k}"
            for mode, cache in (("cold", cold_cache), ("warm", warm_cache)):
                row = one_round(cache, {}, args.max_tokens, args.model, args.serve_arg)
                rows[mode].append(row)
                print(json.dumps({"mode": mode, "round": k, **row}), flush=True)
            shutil.rmtree(cold_cache, ignore_errors=True)
    for mode, runs in rows.items():
        summary = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(json.dumps({"mode": mode, "median_of": len(runs), **summary}))


if __name__ == "__main__":
    sys.exit(main())
