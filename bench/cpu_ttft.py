"""Time from starting ``tessellm generate`` to its first streamed character (target C3).

Runs the command as a user would, as a subprocess, and stamps the first byte it writes to
stdout; prints one JSON line per run and a summary. ``--no-conversion-cache`` sets
``TESSELLM_GGUF_CACHE=0`` so the GGUF metadata, tokenizer and weights are converted again
(the first run after install). The model itself must already be in the cache.

    python bench/cpu_ttft.py --runs 3
    python bench/cpu_ttft.py --runs 1 --no-conversion-cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time


def one_run(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    exe = shutil.which("tessellm") or "tessellm"
    cmd = [exe, "generate", args.prompt, "--max-tokens", str(args.max_tokens)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    first_at = time.perf_counter()
    rest = proc.stdout.read()
    proc.wait()
    end = time.perf_counter()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"tessellm generate failed (exit {proc.returncode})")
    text = (first + rest).decode(errors="replace").strip()
    return {"first_token_s": first_at - start, "total_s": end - start, "chars": len(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-conversion-cache", action="store_true")
    args = parser.parse_args()
    env = dict(os.environ)
    if args.no_conversion_cache:
        env["TESSELLM_GGUF_CACHE"] = "0"
    runs = []
    for _ in range(args.runs):
        runs.append(one_run(args, env))
        print(json.dumps(runs[-1]), flush=True)
    firsts = [r["first_token_s"] for r in runs]
    summary = {
        "runs": len(runs),
        "first_token_s_median": statistics.median(firsts),
        "first_token_s_min": min(firsts),
        "conversion_cache": not args.no_conversion_cache,
        "load_average_1m": os.getloadavg()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
