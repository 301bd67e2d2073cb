"""llama.cpp through llama-cpp-python on the same GGUF file: one sequence at a time.

llama-cpp-python's Python API decodes one sequence per context, so its throughput on a
workload is the requests run back to back; its batch-1 latency is the figure to compare.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from tessellm.bench.workload import BenchRequest
from tessellm.model_loader import ResolvedModel


def unavailable_reason(resolved: ResolvedModel, device_type: str) -> str | None:
    """Why this baseline cannot run here, or None when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (`pip install llama-cpp-python`)"
    if resolved.format_name != "gguf":
        return f"the model is not a GGUF file ({resolved.format_name}); llama.cpp reads GGUF only"
    if device_type != "cpu":
        return f"only run against the CPU platform here (engine ran on {device_type})"
    return None


def load_llama(resolved: ResolvedModel, n_ctx: int, threads: int) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(resolved.path),
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )


def llama_generate(llm: Any, request: BenchRequest) -> tuple[float, list[float]]:
    """Greedy decode of one request, never stopping early; (start, token arrival times)."""
    llm.reset()  # no reuse of the previous request's KV
    times: list[float] = []
    start = time.perf_counter()
    for _token in llm.generate(request.prompt_token_ids, temp=0.0, top_k=1, reset=True):
        times.append(time.perf_counter())
        if len(times) >= request.output_len:
            break
    return start, times


def llama_throughput(llm: Any, requests: list[BenchRequest], bar=None) -> dict[str, float]:
    start = time.perf_counter()
    generated = 0
    for req in requests:
        generated += len(llama_generate(llm, req)[1])
        if bar is not None:
            bar.update(1)
    return {"elapsed_s": time.perf_counter() - start, "output_tokens": generated}
