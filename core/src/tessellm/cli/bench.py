"""``tessellm bench throughput|latency|serve|perplexity``: measure tessellm next to its
baselines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from tessellm.cli.common import KV_CACHE_DTYPE_HELP, MODEL_HELP, EnforceEager, fail, fail_with
from tessellm.config import DEFAULT_MODEL

bench_app = typer.Typer(
    rich_markup_mode=None,  # click's plain help: rich's panels cut option names at 80 columns
    name="bench",
    help="Benchmarks: offline throughput, batch-1 latency, online serving.",
    no_args_is_help=True,
)

Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Dtype = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="Platform: auto, cpu, cuda ...")]
Quantization = Annotated[str | None, typer.Option(help="Quantization method name.")]
AttentionBackend = Annotated[str | None, typer.Option(help="Attention backend name.")]
KvCacheDtype = Annotated[str, typer.Option(help=KV_CACHE_DTYPE_HELP)]
MaxModelLen = Annotated[int | None, typer.Option(min=2)]
TensorParallel = Annotated[int, typer.Option(min=1)]
EngineArg = Annotated[
    list[str] | None,
    typer.Option("--engine-arg", "-e", help="Any other engine argument as KEY=VALUE."),
]
Baseline = Annotated[
    list[str] | None,
    typer.Option(help="Also time a baseline on the same workload: hf, llama.cpp (repeatable)."),
]
BaselineDtype = Annotated[
    str | None, typer.Option(help="dtype for the hf baseline (default: tessellm's dtype).")
]
Json = Annotated[bool, typer.Option("--json", help="Print the report as JSON, not a table.")]
OutputJson = Annotated[str | None, typer.Option(help="Also write the JSON report to this file.")]
Seed = Annotated[int, typer.Option(help="Seed of the random workload.")]


def _options(
    model, dtype, device, quantization, attention_backend, max_model_len, tp, eager, extra
):
    from tessellm.bench.engine_run import EngineOptions, parse_engine_args

    return EngineOptions(
        model=model,
        dtype=dtype,
        device=device,
        quantization=quantization,
        attention_backend=attention_backend,
        max_model_len=max_model_len,
        tensor_parallel_size=tp,
        enforce_eager=eager,
        extra=parse_engine_args(extra),
    )


def _run_and_emit(run: Callable[[], Any], as_json: bool, output_json: str | None) -> None:
    """Run a benchmark; a TessellmError becomes a CLI failure, a report is printed (and
    written to ``output_json`` if given)."""
    from tessellm.errors import TessellmError

    try:
        report = run()
    except TessellmError as exc:
        fail_with(exc)
    if output_json:
        with open(output_json, "w") as f:
            f.write(report.to_json() + "\n")
    typer.echo(report.to_json() if as_json else report.render_table())


def _check_baselines(baselines: list[str] | None) -> list[str]:
    from tessellm.bench.baselines import BASELINES

    chosen = list(baselines or [])
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        fail(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    return chosen


@bench_app.command("throughput")
def throughput(
    model: Model = DEFAULT_MODEL,
    num_prompts: Annotated[int, typer.Option(min=1, help="Requests in the workload.")] = 64,
    input_len: Annotated[str, typer.Option(help="Prompt tokens: N or MIN:MAX.")] = "32",
    output_len: Annotated[str, typer.Option(help="Output tokens: N or MIN:MAX.")] = "128",
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Most requests run at once.")] = 256,
    max_num_batched_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    baseline: Baseline = None,
    hf_batch_size: Annotated[
        int | None, typer.Option(min=1, help="HF static batch size (default: max-num-seqs).")
    ] = None,
    baseline_dtype: BaselineDtype = None,
    baseline_num_prompts: Annotated[
        int | None, typer.Option(min=1, help="Time baselines on the first N requests only.")
    ] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    quantization: Quantization = None,
    attention_backend: AttentionBackend = None,
    kv_cache_dtype: KvCacheDtype = "auto",
    max_model_len: MaxModelLen = None,
    tensor_parallel_size: TensorParallel = 1,
    enforce_eager: EnforceEager = False,
    engine_arg: EngineArg = None,
    seed: Seed = 0,
    json_output: Json = False,
    output_json: OutputJson = None,
) -> None:
    """Offline throughput: all requests at once, greedy, ignore_eos; output tokens/s."""
    from tessellm.bench.throughput import ThroughputSettings, run_throughput
    from tessellm.bench.workload import LengthRange

    def run():
        options = _options(
            model, dtype, device, quantization, attention_backend, max_model_len,
            tensor_parallel_size, enforce_eager, engine_arg,
        )  # fmt: skip
        options.extra.setdefault("kv_cache_dtype", kv_cache_dtype)  # --engine-arg wins
        options.max_num_seqs = max_num_seqs
        options.max_num_batched_tokens = max_num_batched_tokens
        settings = ThroughputSettings(
            num_prompts=num_prompts,
            input_len=LengthRange.parse(input_len),
            output_len=LengthRange.parse(output_len),
            baselines=_check_baselines(baseline),
            hf_batch_size=hf_batch_size,
            baseline_dtype=baseline_dtype,
            baseline_num_prompts=baseline_num_prompts,
            seed=seed,
        )
        return run_throughput(options, settings)

    _run_and_emit(run, json_output, output_json)


@bench_app.command("latency")
def latency(
    model: Model = DEFAULT_MODEL,
    input_len: Annotated[int, typer.Option(min=1, help="Prompt tokens.")] = 32,
    output_len: Annotated[int, typer.Option(min=2, help="Output tokens.")] = 128,
    num_iters: Annotated[int, typer.Option(min=1, help="Timed requests.")] = 5,
    num_iters_warmup: Annotated[int, typer.Option(min=0, help="Untimed requests first.")] = 1,
    baseline: Baseline = None,
    baseline_dtype: BaselineDtype = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    quantization: Quantization = None,
    attention_backend: AttentionBackend = None,
    kv_cache_dtype: KvCacheDtype = "auto",
    max_model_len: MaxModelLen = None,
    tensor_parallel_size: TensorParallel = 1,
    enforce_eager: EnforceEager = False,
    engine_arg: EngineArg = None,
    seed: Seed = 0,
    json_output: Json = False,
    output_json: OutputJson = None,
) -> None:
    """Batch-1 latency: time to first token and time per output token, greedy."""
    from tessellm.bench.latency import LatencySettings, run_latency

    def run():
        options = _options(
            model, dtype, device, quantization, attention_backend, max_model_len,
            tensor_parallel_size, enforce_eager, engine_arg,
        )  # fmt: skip
        options.extra.setdefault("kv_cache_dtype", kv_cache_dtype)  # --engine-arg wins
        settings = LatencySettings(
            input_len=input_len,
            output_len=output_len,
            num_iters=num_iters,
            num_iters_warmup=num_iters_warmup,
            baselines=_check_baselines(baseline),
            baseline_dtype=baseline_dtype,
            seed=seed,
        )
        return run_latency(options, settings)

    _run_and_emit(run, json_output, output_json)


@bench_app.command("perplexity")
def perplexity(
    model: Model = DEFAULT_MODEL,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="Quantization method to score (repeatable); the first is the baseline the "
            "others are compared with. Default: none, then the model's default (auto).",
        ),
    ] = None,
    window: Annotated[int, typer.Option(min=2, help="Tokens per scored window.")] = 256,
    text_file: Annotated[
        str | None, typer.Option(help="Text to score (default: the text shipped with tessellm).")
    ] = None,
    max_windows: Annotated[int | None, typer.Option(min=1, help="Score at most this many.")] = None,
    dtype: Dtype = "auto",
    device: Device = "auto",
    attention_backend: AttentionBackend = None,
    max_model_len: MaxModelLen = None,
    engine_arg: EngineArg = None,
    json_output: Json = False,
    output_json: OutputJson = None,
) -> None:
    """Perplexity of a fixed text under each quantization method, in one run."""
    from tessellm.bench.perplexity import PerplexitySettings, run_perplexity

    def run():
        options = _options(
            model, dtype, device, None, attention_backend, max_model_len, 1, True, engine_arg
        )
        settings = PerplexitySettings(
            methods=method or ["none", "auto"],
            window=window,
            text_file=text_file,
            max_windows=max_windows,
        )
        return run_perplexity(options, settings)

    _run_and_emit(run, json_output, output_json)


@bench_app.command("serve")
def serve(
    base_url: Annotated[str, typer.Option(help="The server's OpenAI base URL.")] = (
        "http://127.0.0.1:8000/v1"
    ),
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Served model name (default: first).")
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Draw prompt ids from this model's tokenizer.")
    ] = None,
    vocab_size: Annotated[
        int, typer.Option(min=2, help="Without --tokenizer, prompt ids lie below this.")
    ] = 32000,
    text_prompts: Annotated[
        bool,
        typer.Option(
            help="Send prompts as text of --input-len tokens of --tokenizer (servers that "
            "take no token ids)."
        ),
    ] = False,
    ignore_eos: Annotated[
        bool,
        typer.Option(help="Ask for every output token (vLLM's ignore_eos; some peers refuse it)."),
    ] = True,
    num_prompts: Annotated[int, typer.Option(min=1)] = 64,
    input_len: Annotated[str, typer.Option(help="Prompt tokens: N or MIN:MAX.")] = "32",
    output_len: Annotated[str, typer.Option(help="Output tokens: N or MIN:MAX.")] = "128",
    request_rate: Annotated[
        float, typer.Option(help="Poisson arrivals per second; inf sends all at once.")
    ] = float("inf"),
    max_concurrency: Annotated[int | None, typer.Option(min=1)] = None,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
    seed: Seed = 0,
    json_output: Json = False,
    output_json: OutputJson = None,
) -> None:
    """Online serving: streamed completions with Poisson arrivals; TTFT, TPOT, ITL."""
    import importlib.util

    if importlib.util.find_spec("httpx") is None:
        fail("bench serve needs httpx: pip install httpx")
    from tessellm.bench.serve import ServeSettings, run_serve
    from tessellm.bench.workload import LengthRange

    def run():
        settings = ServeSettings(
            base_url=base_url,
            model=model,
            api_key=api_key,
            num_prompts=num_prompts,
            input_len=LengthRange.parse(input_len),
            output_len=LengthRange.parse(output_len),
            request_rate=request_rate,
            max_concurrency=max_concurrency,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            text_prompts=text_prompts,
            ignore_eos=ignore_eos,
            seed=seed,
        )
        return run_serve(settings)

    _run_and_emit(run, json_output, output_json)
