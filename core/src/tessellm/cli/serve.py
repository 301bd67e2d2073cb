"""``tessellm serve``: the OpenAI-compatible HTTP server. This module holds the command's
options and turns them into engine arguments; ``cli/serve_http.py`` runs the server."""

from __future__ import annotations

from typing import Annotated

import typer

from tessellm.cli.common import (
    DOWNLOAD_DIR_HELP,
    ENFORCE_EAGER_HELP,
    KV_CACHE_DTYPE_HELP,
    MODEL_HELP,
    PIPELINE_HELP,
    REVISION_HELP,
    SPECULATIVE_CONFIG_HELP,
    USER_ERROR,
    fail,
    fail_with,
    progress_note,
    start_async_engine,
)
from tessellm.cli.serve_http import draining_server, serve_several_models
from tessellm.config import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MODEL

ENGINE = "Engine"
SERVER = "Server"


def serve(
    model_tag: Annotated[
        str | None,
        typer.Argument(
            metavar="[MODEL]", help="The model, as vLLM's `serve MODEL` (same as --model)."
        ),
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help=MODEL_HELP + " Repeatable: several models on one port, routed by the "
            "request's model (the first answers requests that name none).",
            show_default=False,
        ),
    ] = None,
    models_config: Annotated[
        str | None,
        typer.Option(
            help="A YAML or JSON file listing models to serve: [{model, served_model_name, "
            "<engine arguments>...}]; each entry's keys override the command line's.",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = None,
    max_loaded_models: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Several models: most loaded at once; the least recently used idle one is "
            "unloaded to load another (default: no limit).",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = None,
    models_memory_budget: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Several models: bytes the loaded ones may take (weights + KV cache, "
            "estimated); the least recently used idle ones are unloaded to stay within it.",
            rich_help_panel=SERVER,
            show_default=False,
        ),
    ] = None,
    model_load_timeout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Several models: seconds a request waits for its model to load (and for "
            "room to load it) before a 503.",
            rich_help_panel=SERVER,
        ),
    ] = 300.0,
    host: Annotated[str, typer.Option(help="Address to listen on.", rich_help_panel=SERVER)] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=0, max=65535, rich_help_panel=SERVER)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TESSELLM_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 routes.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(
            help="Name(s) clients use for the model (default: --model). Repeatable.",
            rich_help_panel=SERVER,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(rich_help_panel=SERVER)] = "info",
    shutdown_timeout: Annotated[
        int,
        typer.Option(
            min=0,
            help="On SIGINT/SIGTERM, seconds in-flight requests get to finish (new ones are "
            "refused); then each ends with an error (a stream: an error event, then [DONE]). "
            "A second signal ends them at once.",
            rich_help_panel=SERVER,
        ),
    ] = 30,
    max_request_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Largest request body accepted, in bytes; a larger one gets a 413 before it "
            "is read (inline base64 images count).",
            rich_help_panel=SERVER,
        ),
    ] = DEFAULT_MAX_REQUEST_BYTES,
    max_model_len: Annotated[
        int | None,
        typer.Option(min=2, help="Context length (default: the model's).", rich_help_panel=ENGINE),
    ] = None,
    max_num_seqs: Annotated[
        int, typer.Option(min=1, help="Most sequences per step.", rich_help_panel=ENGINE)
    ] = 256,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(min=1, help="Most tokens per step (chunked prefill).", rich_help_panel=ENGINE),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="auto, float32, bfloat16 or float16.", rich_help_panel=ENGINE)
    ] = "auto",
    device: Annotated[
        str, typer.Option(help="Platform: auto, cpu, cuda ...", rich_help_panel=ENGINE)
    ] = "auto",
    enable_prefix_caching: Annotated[
        bool,
        typer.Option("--enable-prefix-caching/--no-enable-prefix-caching", rich_help_panel=ENGINE),
    ] = True,
    enable_mixed_batches: Annotated[
        bool | None,
        typer.Option(
            "--enable-mixed-batches/--no-enable-mixed-batches",
            help="Decode tokens in steps with prompt work (default: the platform's choice).",
            rich_help_panel=ENGINE,
            show_default=False,
        ),
    ] = None,
    block_size: Annotated[int, typer.Option(rich_help_panel=ENGINE)] = 16,
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", "-tp", min=1, rich_help_panel=ENGINE)
    ] = 1,
    pipeline_parallel_size: Annotated[
        int,
        typer.Option(
            "--pipeline-parallel-size",
            "-pp",
            min=1,
            help=PIPELINE_HELP,
            rich_help_panel=ENGINE,
        ),
    ] = 1,
    distributed_executor_backend: Annotated[
        str | None,
        typer.Option(
            "--distributed-executor-backend",
            "--executor",
            help="How tensor-parallel ranks run: mp (local processes) or ray.",
            rich_help_panel=ENGINE,
        ),
    ] = None,
    data_parallel_size: Annotated[
        int,
        typer.Option(
            "--data-parallel-size",
            "-dp",
            min=1,
            help="Engine replicas, each in its own process; requests go to the least loaded.",
            rich_help_panel=ENGINE,
        ),
    ] = 1,
    enable_expert_parallel: Annotated[
        bool,
        typer.Option(
            help="MoE models: spread whole experts over the tensor-parallel ranks instead "
            "of slicing every expert.",
            rich_help_panel=ENGINE,
        ),
    ] = False,
    gpu_memory_utilization: Annotated[
        float, typer.Option(min=0.0, max=1.0, rich_help_panel=ENGINE)
    ] = 0.9,
    tokenizer: Annotated[str | None, typer.Option(rich_help_panel=ENGINE)] = None,
    revision: Annotated[
        str | None, typer.Option(help=REVISION_HELP, rich_help_panel=ENGINE)
    ] = None,
    download_dir: Annotated[
        str | None, typer.Option(help=DOWNLOAD_DIR_HELP, rich_help_panel=ENGINE)
    ] = None,
    seed: Annotated[int, typer.Option(rich_help_panel=ENGINE)] = 0,
    max_logprobs: Annotated[int, typer.Option(min=0, rich_help_panel=ENGINE)] = 20,
    attention_backend: Annotated[str | None, typer.Option(rich_help_panel=ENGINE)] = None,
    kv_cache_dtype: Annotated[
        str, typer.Option(help=KV_CACHE_DTYPE_HELP, rich_help_panel=ENGINE)
    ] = "auto",
    enforce_eager: Annotated[
        bool,
        typer.Option(help=ENFORCE_EAGER_HELP, rich_help_panel=ENGINE),
    ] = False,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="How tool_choice 'auto' reads calls out of answers: hermes, llama3_json, "
            "mistral or another registered parser (default: detected from the chat "
            "template and architecture).",
            rich_help_panel=SERVER,
        ),
    ] = None,
    enable_auto_tool_choice: Annotated[
        bool,
        typer.Option(
            help="Accepted as vLLM's flag; tool_choice 'auto' is on whenever a parser fits. "
            "With it, serve refuses to start when none does.",
            rich_help_panel=SERVER,
        ),
    ] = False,
    enable_lora: Annotated[
        bool,
        typer.Option(help="Serve LoRA adapters beside the base model.", rich_help_panel=ENGINE),
    ] = False,
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(
            help="LoRA adapters to serve, as NAME=PATH (PEFT format; repeatable); a request's "
            "model picks one by NAME. Implies --enable-lora.",
            rich_help_panel=ENGINE,
            show_default=False,
        ),
    ] = None,
    max_loras: Annotated[
        int, typer.Option(min=1, help="LoRA adapters in one batch.", rich_help_panel=ENGINE)
    ] = 1,
    max_lora_rank: Annotated[
        int, typer.Option(min=1, help="Highest LoRA rank accepted.", rich_help_panel=ENGINE)
    ] = 16,
    speculative_config: Annotated[
        str | None,
        typer.Option(help=SPECULATIVE_CONFIG_HELP, rich_help_panel=ENGINE, show_default=False),
    ] = None,
    structured_outputs_backend: Annotated[
        str,
        typer.Option(
            help="Grammar backend of response_format and structured_outputs: auto "
            "(xgrammar, else llguidance), or a registered backend's name; a request's "
            "structured_outputs.backend overrides it.",
            rich_help_panel=ENGINE,
        ),
    ] = "auto",
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1), with /health and /metrics."""
    models = list(model or [])
    if model_tag is not None:
        if models and models != [model_tag]:
            fail(f"the model is given twice ({model_tag!r} and --model {models[0]!r})", USER_ERROR)
        models = [model_tag]
    try:  # the serve extra, checked before any model loads
        import uvicorn  # noqa: F401

        from tessellm.server.app import build_app
    except ImportError as exc:
        fail(f"the server needs the serve extra: pip install 'tessellm[serve]' ({exc})")

    from tessellm.config import EngineArgs
    from tessellm.errors import TessellmError
    from tessellm.server.models_config import build_model_specs, read_models_config

    try:
        entries = read_models_config(models_config) if models_config else []
    except TessellmError as exc:
        fail_with(exc)
    model = models[0] if models else entries[0]["model"] if entries else DEFAULT_MODEL
    names = list(served_model_name or [model])
    try:  # adapters checked before the model loads
        from tessellm.server.routes_lora import parse_lora_modules

        adapters = parse_lora_modules(lora_modules or [])
    except TessellmError as exc:
        fail_with(exc)
    if tool_call_parser is not None:
        from tessellm.server.tool_setup import check_parser_name

        try:
            check_parser_name(tool_call_parser)  # before the model loads
        except TessellmError as exc:
            fail_with(exc)
    try:
        args = EngineArgs(
            model=model,
            tokenizer=tokenizer,
            revision=revision,
            download_dir=download_dir,
            dtype=dtype,
            device=device,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            enable_mixed_batches=enable_mixed_batches,
            block_size=block_size,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            enable_expert_parallel=enable_expert_parallel,
            gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=max_logprobs,
            enforce_eager=enforce_eager,
            attention_backend=attention_backend,
            kv_cache_dtype=kv_cache_dtype,
            structured_outputs_backend=structured_outputs_backend,
            speculative_config=speculative_config,
            enable_lora=enable_lora or bool(lora_modules),
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            served_model_name=names[0],
        )
        cli_models = models or ([] if entries else [model])
        specs = build_model_specs(
            args, cli_models, list(served_model_name or []), entries, data_parallel_size, adapters
        )
        from tessellm.lora.adapter import read_adapter_config

        for spec in specs:
            for _name, path in spec.lora_modules:
                read_adapter_config(path, spec.args.max_lora_rank)
        if len(specs) == 1:
            args, names, adapters = specs[0].args, specs[0].names, specs[0].lora_modules
            progress_note(f"tessellm serve: loading {args.model} ...")
            engine = start_async_engine(args, specs[0].data_parallel_size)
    except TessellmError as exc:
        fail_with(exc)
    if len(specs) > 1:  # several models: routed by the request's model
        serve_several_models(
            specs, host, port, api_key, log_level, shutdown_timeout, tool_call_parser,
            enable_auto_tool_choice, max_loaded_models, models_memory_budget, model_load_timeout,
            max_request_bytes,
        )  # fmt: skip
        return
    app = build_app(
        engine,
        names,
        model_root=args.model,
        api_key=api_key,
        shutdown_timeout=shutdown_timeout,
        lora_modules=adapters,
        max_request_bytes=max_request_bytes,
    )
    from tessellm.server.tool_setup import configure_tool_calling

    try:
        progress_note(configure_tool_calling(app, tool_call_parser, enable_auto_tool_choice))
    except TessellmError as exc:  # a worker process ends with this one
        fail_with(exc)
    progress_note(
        f"tessellm serve: {', '.join(names)} (max_model_len {engine.max_model_len}) "
        f"on http://{host}:{port}/v1"
    )
    server = draining_server(app, host, port, log_level, shutdown_timeout)
    # A dead engine (a worker process died, the device is lost) cannot serve again: stop,
    # and exit non-zero so that a supervisor restarts the server.
    engine.on_dead(lambda error: setattr(server, "should_exit", True))
    server.run()
    if engine.dead is not None:
        fail(f"the engine stopped ({engine.dead!r}); exiting so that the server can be restarted")
