"""``tessellm bench throughput``: N requests submitted at once, output tokens per second.

tessellm runs the workload with continuous batching; each baseline then runs the same
requests on the same checkpoint in the same process after tessellm's engine is freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessellm.bench.engine_run import (
    EngineOptions,
    build_engine,
    describe_engine,
    engine_workload,
    release_engine,
    run_requests,
    speculative_metrics,
)
from tessellm.bench.report import BenchReport, progress
from tessellm.bench.workload import BenchRequest, LengthRange, total_input_tokens


@dataclass
class ThroughputSettings:
    num_prompts: int = 64
    input_len: LengthRange = field(default_factory=lambda: LengthRange(32, 32))
    output_len: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    baselines: list[str] = field(default_factory=list)
    hf_batch_size: int | None = None  # None: as many as tessellm may run at once
    baseline_dtype: str | None = None  # None: the dtype tessellm ran in
    baseline_num_prompts: int | None = None  # None: the whole workload
    seed: int = 0


def rates(requests: list[BenchRequest], measured: dict[str, float]) -> dict[str, float | int]:
    elapsed = measured["elapsed_s"]
    generated = int(measured["output_tokens"])
    return {
        "requests": len(requests),
        "elapsed_s": round(elapsed, 3),
        "req_s": len(requests) / elapsed,
        "output_tok_s": generated / elapsed,
        "total_tok_s": (total_input_tokens(requests) + generated) / elapsed,
    }


def run_throughput(options: EngineOptions, settings: ThroughputSettings) -> BenchReport:
    report = BenchReport(
        "throughput",
        {
            "model": options.model,
            "num_prompts": settings.num_prompts,
            "input_len": str(settings.input_len),
            "output_len": str(settings.output_len),
            "max_num_seqs": options.max_num_seqs,
            "greedy": True,
            "ignore_eos": True,
        },
        headline="output_tok_s",
    )
    engine = build_engine(options)
    engine_info = describe_engine(engine)
    report.record_engine(engine_info)
    requests = engine_workload(
        engine, settings.num_prompts, settings.input_len, settings.output_len, settings.seed
    )
    # Warm-up on other random prompts: first-call allocations and lazy set-up are not
    # throughput, and distinct prompts keep the prefix cache from helping the timed run.
    warm = engine_workload(
        engine, min(4, settings.num_prompts), settings.input_len, LengthRange(4, 4), seed=-1
    )
    run_requests(engine, warm)
    bar = progress(len(requests), "tessellm")
    measured = run_requests(engine, requests, bar)
    bar.close()
    report.add(
        "tessellm",
        {
            "dtype": engine_info.get("dtype"),
            **rates(requests, measured),
            **speculative_metrics(engine),
        },
    )
    resolved, plugins = engine.resolved, engine.plugins
    device, dtype = engine_info.get("device", "cpu"), engine_info.get("dtype", "float32")
    max_len = engine.max_model_len
    hf_batch = settings.hf_batch_size or min(options.max_num_seqs, len(requests))
    release_engine(engine)
    del engine

    subset = requests[: settings.baseline_num_prompts or len(requests)]
    for name in settings.baselines:
        if name == "hf":
            _run_hf(
                report,
                resolved,
                plugins,
                subset,
                hf_batch,
                settings.baseline_dtype or dtype,
                device,
            )
        elif name == "llama.cpp":
            _run_llama_cpp(report, resolved, subset, device, max_len)
        else:
            report.skip(name, "unknown baseline (known: hf, llama.cpp)")
    return report


def _run_hf(report, resolved, plugins, requests, batch_size, dtype_name, device) -> None:
    import torch

    from tessellm import model_loader as ml
    from tessellm.bench.baselines import hf

    dtype = getattr(torch, dtype_name)
    model = hf.load_hf_model(resolved, ml.weight_format(plugins, resolved), dtype, device)
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    hf.generate_batch(model, requests[:1], pad_id, device)  # warm-up
    bar = progress(len(requests), "hf generate")
    measured = hf.hf_throughput(model, requests, batch_size, pad_id, device, bar)
    bar.close()
    report.add(
        "hf",
        {"dtype": dtype_name, **rates(requests, measured)},
        note=f"transformers generate(), static batches of {batch_size}, left-padded",
    )


def _run_llama_cpp(report, resolved, requests, device, max_len) -> None:
    import torch

    from tessellm.bench.baselines import llama_cpp

    reason = llama_cpp.unavailable_reason(resolved, device.split(":")[0])
    if reason:
        report.skip("llama.cpp", reason)
        return
    n_ctx = min(max_len, max(r.input_len + r.output_len for r in requests) + 8)
    llm = llama_cpp.load_llama(resolved, n_ctx, torch.get_num_threads())
    llama_cpp.llama_generate(llm, BenchRequest(requests[0].prompt_token_ids, 4))  # warm-up
    bar = progress(len(requests), "llama.cpp")
    measured = llama_cpp.llama_throughput(llm, requests, bar)
    bar.close()
    report.add(
        "llama.cpp",
        {"dtype": "gguf", **rates(requests, measured)},
        note="llama-cpp-python, one request at a time (its Python API has no batching)",
    )
