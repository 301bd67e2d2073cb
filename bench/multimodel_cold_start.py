"""Time to first token on a server of several models: a cold model (not loaded: the
request waits for the least recently used one to unload and for its own load) against a
loaded one.

Serves the same checkpoint under two names (two engines) with ``--max-loaded-models 1``,
so that every request to the other name is cold. Each round sends a warm request (the
loaded name), then a cold one (the other), streamed; the time to the first generated
text is stamped on the client. Prints one JSON line per round and a summary of medians,
with the load times the server measured (``tessellm:model_load_seconds``).

    python bench/multimodel_cold_start.py --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def start_server(args: argparse.Namespace, config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "tessellm.cli.app", "serve", "--models-config", str(config),
           "--max-loaded-models", "1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def first_token_seconds(url: str, model: str, args: argparse.Namespace) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
    }
    start = time.perf_counter()
    first = None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter() - start
    if first is None:
        raise SystemExit(f"no text streamed from {model}")
    return first


def load_seconds(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.findall(r'tessellm:model_load_seconds\{model="([^"]+)"\} (\S+)', text)
    return {name: float(value) for name, value in found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "models.json"
        entries = [{"model": args.model, "served_model_name": name} for name in ("a", "b")]
        config.write_text(json.dumps(entries))
        proc, url = start_server(args, config, Path(tmp) / "server.log")
        try:
            loaded, other = "a", "b"  # the default loads at start
            first_token_seconds(url, loaded, args)  # the first request's one-time costs
            rounds = []
            for i in range(args.rounds):
                warm = first_token_seconds(url, loaded, args)
                cold = first_token_seconds(url, other, args)
                loads = load_seconds(url)
                rounds.append({"round": i, "warm_s": warm, "cold_s": cold, "load_s": loads[other]})
                print(json.dumps(rounds[-1]), flush=True)
                loaded, other = other, loaded
        finally:
            proc.terminate()
            proc.wait(60)

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rounds), 4)

    print(json.dumps({
        "model": args.model,
        "rounds": len(rounds),
        "warm_first_token_s_median": median("warm_s"),
        "cold_first_token_s_median": median("cold_s"),
        "engine_load_s_median": median("load_s"),
        "cold_over_warm": round(median("cold_s") / median("warm_s"), 1),
        "load_average_1m": os.getloadavg()[0],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
