"""``tessellm bench latency``: one request at a time; time to first token and per token.

Each iteration uses a fresh random prompt (so the prefix cache cannot help) and records
when every output token arrives. Figures are medians over the iterations.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from tessellm.bench.engine_run import (
    EngineOptions,
    build_engine,
    describe_engine,
    engine_workload,
    greedy_params,
    release_engine,
    speculative_metrics,
)
from tessellm.bench.report import BenchReport, progress
from tessellm.bench.workload import BenchRequest, LengthRange

Sample = tuple[float, list[float]]  # (start time, arrival time of each output token)


@dataclass
class LatencySettings:
    input_len: int = 32
    output_len: int = 128
    num_iters: int = 5
    num_iters_warmup: int = 1
    baselines: list[str] = field(default_factory=list)
    baseline_dtype: str | None = None
    seed: int = 0


def summarize(samples: list[Sample], output_len: int) -> dict[str, float | int]:
    """Medians over iterations of TTFT, time per output token (after the first), e2e."""
    ttft = [times[0] - start for start, times in samples]
    tpot = [(times[-1] - times[0]) / (len(times) - 1) for _, times in samples if len(times) > 1]
    e2e = [times[-1] - start for start, times in samples]
    tpot_s = statistics.median(tpot) if tpot else float("nan")
    e2e_s = statistics.median(e2e)
    return {
        "iters": len(samples),
        "ttft_ms": statistics.median(ttft) * 1e3,
        "tpot_ms": tpot_s * 1e3,
        "decode_tok_s": 1.0 / tpot_s if tpot else float("nan"),
        "e2e_s": round(e2e_s, 3),
        "e2e_tok_s": output_len / e2e_s,
    }


def tessellm_once(engine, request: BenchRequest, request_id: str) -> Sample:
    start = time.perf_counter()
    engine.add_request(request_id, request.prompt_token_ids, greedy_params(request.output_len))
    times: list[float] = []
    seen = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            count = len(out.outputs[0].token_ids)
            times.extend([now] * (count - seen))
            seen = count
    return start, times


def _requests(engine, settings: LatencySettings, count: int) -> list[BenchRequest]:
    length = LengthRange(settings.input_len, settings.input_len)
    out = LengthRange(settings.output_len, settings.output_len)
    return engine_workload(engine, count, length, out, settings.seed)


def run_latency(options: EngineOptions, settings: LatencySettings) -> BenchReport:
    options.max_num_seqs = 1
    report = BenchReport(
        "latency",
        {
            "model": options.model,
            "batch_size": 1,
            "input_len": settings.input_len,
            "output_len": settings.output_len,
            "num_iters": settings.num_iters,
            "greedy": True,
        },
        headline="decode_tok_s",
    )
    engine = build_engine(options)
    info = describe_engine(engine)
    report.record_engine(info)
    total = settings.num_iters_warmup + settings.num_iters
    requests = _requests(engine, settings, total)
    warm, timed = requests[: settings.num_iters_warmup], requests[settings.num_iters_warmup :]
    for i, req in enumerate(warm):
        tessellm_once(engine, req, f"warm{i}")
    bar = progress(len(timed), "tessellm")
    samples = []
    for i, req in enumerate(timed):
        samples.append(tessellm_once(engine, req, f"lat{i}"))
        bar.update(1)
    bar.close()
    report.add(
        "tessellm",
        {
            "dtype": info.get("dtype"),
            **summarize(samples, settings.output_len),
            **speculative_metrics(engine),
        },
    )
    resolved, plugins, max_len = engine.resolved, engine.plugins, engine.max_model_len
    device, dtype = info.get("device", "cpu"), info.get("dtype", "float32")
    release_engine(engine)
    del engine
    for name in settings.baselines:
        if name == "hf":
            _hf(
                report,
                resolved,
                plugins,
                warm,
                timed,
                settings,
                settings.baseline_dtype or dtype,
                device,
            )
        elif name == "llama.cpp":
            _llama_cpp(report, resolved, warm, timed, settings, device, max_len)
        else:
            report.skip(name, "unknown baseline (known: hf, llama.cpp)")
    return report


def _hf(report, resolved, plugins, warm, timed, settings, dtype_name, device) -> None:
    import torch

    from tessellm import model_loader as ml
    from tessellm.bench.baselines import hf

    model = hf.load_hf_model(
        resolved, ml.weight_format(plugins, resolved), getattr(torch, dtype_name), device
    )
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    for req in warm or timed[:1]:
        hf.hf_latency_once(model, req, pad_id, device)
    bar = progress(len(timed), "hf generate")
    samples = []
    for req in timed:
        samples.append(hf.hf_latency_once(model, req, pad_id, device))
        bar.update(1)
    bar.close()
    report.add(
        "hf",
        {"dtype": dtype_name, **summarize(samples, settings.output_len)},
        note="transformers generate(), batch 1",
    )


def _llama_cpp(report, resolved, warm, timed, settings, device, max_len) -> None:
    import torch

    from tessellm.bench.baselines import llama_cpp

    reason = llama_cpp.unavailable_reason(resolved, device.split(":")[0])
    if reason:
        report.skip("llama.cpp", reason)
        return
    n_ctx = min(max_len, settings.input_len + settings.output_len + 8)
    threads = torch.get_num_threads()
    llm = llama_cpp.load_llama(resolved, n_ctx, threads)
    for req in warm or timed[:1]:
        llama_cpp.llama_generate(llm, req)
    bar = progress(len(timed), "llama.cpp")
    samples = []
    for req in timed:
        samples.append(llama_cpp.llama_generate(llm, req))
        bar.update(1)
    bar.close()
    report.add(
        "llama.cpp",
        {"dtype": "gguf", **summarize(samples, settings.output_len)},
        note=f"llama-cpp-python, {threads} thread{'s' if threads != 1 else ''}",
    )
