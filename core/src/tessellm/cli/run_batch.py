"""``tessellm run-batch``: an OpenAI Batch API file in, one result line out per request.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` for
``/v1/completions`` or ``/v1/chat/completions``. The lines run through the server's own app,
called in-process (ASGI, no socket): the same request models, validation, sampling
translation, response builders and error shapes as ``tessellm serve``, on one engine that
batches them. Each output line is OpenAI's batch output record::

    {"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}

in input order. A request the endpoint refuses gets its HTTP status and OpenAI error body
in ``response``; a line that never reaches an endpoint (not JSON, an unknown url, a body
that is not an object) gets a 400 there too, and ``error`` says why. The rest still run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from tessellm.cli.common import (
    DOWNLOAD_DIR_HELP,
    ENFORCE_EAGER_HELP,
    KV_CACHE_DTYPE_HELP,
    MODEL_HELP,
    REVISION_HELP,
    USER_ERROR,
    fail,
    fail_with,
    progress_note,
    start_async_engine,
)
from tessellm.config import DEFAULT_MODEL

URLS = ("/v1/completions", "/v1/chat/completions")
ENGINE = "Engine"
# Requests handed to the engine at once, per sequence slot: enough to keep every slot
# busy while finished ones are replaced, without tokenizing a whole large file up front.
IN_FLIGHT_PER_SEQ = 2


@dataclass(slots=True)
class BatchLine:
    """One input line that is a request to run."""

    index: int  # its place among the input's requests (blank lines skipped)
    custom_id: Any
    url: str
    body: bytes


def record(custom_id: Any, status: int, body: Any, error: dict[str, str] | None) -> dict:
    """One output line in OpenAI's batch output format."""
    request_id = body.get("id") if isinstance(body, dict) and status == 200 else None
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": request_id or f"req_{uuid.uuid4().hex}",
            "body": body,
        },
        "error": error,
    }


def line_error(custom_id: Any, code: str, message: str, param: str | None = None) -> dict:
    """The record of a line that never reached an endpoint: a 400 as the server words it."""
    from tessellm.server.errors import APIError

    body = APIError(400, message, param=param, code=code).body()
    return record(custom_id, 400, body, {"code": code, "message": message})


def parse_line(index: int, number: int, text: str) -> BatchLine | dict:
    """A request to run, or the error record of a line that is not one."""
    try:
        item = json.loads(text)
    except ValueError as exc:
        return line_error(None, "invalid_json", f"line {number} is not valid JSON: {exc}")
    if not isinstance(item, dict):
        return line_error(None, "invalid_request", f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str):
        return line_error(custom_id, "invalid_request", f"line {number} has no string custom_id")
    method = item.get("method", "POST")
    if not isinstance(method, str) or method.upper() != "POST":
        return line_error(custom_id, "invalid_method", f"method must be POST, not {method!r}")
    url = item.get("url")
    if url not in URLS:
        return line_error(
            custom_id, "invalid_url", f"url must be one of {', '.join(URLS)}, not {url!r}", "url"
        )
    body = item.get("body")
    if not isinstance(body, dict):
        return line_error(custom_id, "invalid_request", "body must be a JSON object", "body")
    if body.get("stream") is True:
        return line_error(custom_id, "invalid_request", "a batch request cannot stream", "stream")
    return BatchLine(index, custom_id, url, json.dumps(body).encode())


async def call_app(app: Any, url: str, body: bytes) -> tuple[int, Any]:
    """POST ``body`` to ``url`` of an ASGI app in this process; (status, decoded JSON)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": url,
        "raw_path": url.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"run-batch"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 0),
        "server": ("run-batch", 0),
    }
    responded = asyncio.Event()
    sent = False
    status = 500
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await responded.wait()  # the "client" stays until the whole answer is there
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                responded.set()

    try:
        await app(scope, receive, send)
    except Exception:
        # Starlette re-raises an unexpected error after its handler has answered (and
        # logged) it, for the server to see: the answer is what counts here.
        if not responded.is_set():
            raise
    finally:
        responded.set()
    raw = b"".join(chunks)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, {"error": {"message": raw.decode(errors="replace"), "type": "server_error"}}


async def run_lines(
    app: Any, items: list[BatchLine | dict], out: IO[str], in_flight: int, progress: Any
) -> tuple[int, int]:
    """Run every request through ``app`` (at most ``in_flight`` at once) and write each
    line's record to ``out`` in input order; returns (succeeded, failed)."""
    done: dict[int, dict] = {}
    next_to_write = 0
    counts = [0, 0]
    slots = asyncio.Semaphore(in_flight)

    def finish(index: int, result: dict) -> None:
        nonlocal next_to_write
        done[index] = result
        counts[0 if result["response"]["status_code"] == 200 else 1] += 1
        progress.update(1)
        while next_to_write in done:
            out.write(json.dumps(done.pop(next_to_write)) + "\n")
            next_to_write += 1
        out.flush()

    async def run_one(item: BatchLine) -> None:
        try:
            status, body = await call_app(app, item.url, item.body)
            finish(item.index, record(item.custom_id, status, body, None))
        finally:
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    async with app.router.lifespan_context(app):  # starts and stops the engine thread
        try:
            for index, item in enumerate(items):
                if isinstance(item, dict):
                    finish(index, item)
                    continue
                await slots.acquire()
                tasks.append(asyncio.create_task(run_one(item)))
            await asyncio.gather(*tasks)
        finally:
            # After Ctrl-C (this task cancelled): end the requests while the engine still
            # runs, so that none is left waiting on an engine that is gone.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return counts[0], counts[1]


def read_items(input_file: Path) -> list[BatchLine | dict]:
    try:
        text = sys.stdin.read() if str(input_file) == "-" else input_file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the input file {input_file}: {exc}", USER_ERROR)
    items: list[BatchLine | dict] = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            items.append(parse_line(len(items), number, line))
    return items


def run_batch(
    input_file: Annotated[
        Path,
        typer.Option(
            "--input-file", "-i", help="OpenAI Batch API JSONL: one request a line ('-': stdin)."
        ),
    ],
    output_file: Annotated[
        Path,
        typer.Option(
            "--output-file", "-o", help="Where the JSONL results go, one a line ('-': stdout)."
        ),
    ],
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = DEFAULT_MODEL,
    served_model_name: Annotated[
        list[str] | None,
        typer.Option(help='Name(s) the requests\' "model" may use (default: --model).'),
    ] = None,
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
    block_size: Annotated[int, typer.Option(min=1, rich_help_panel=ENGINE)] = 16,
    tensor_parallel_size: Annotated[
        int, typer.Option("--tensor-parallel-size", "-tp", min=1, rich_help_panel=ENGINE)
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
            "--data-parallel-size", "-dp", min=1, help="Engine replicas.", rich_help_panel=ENGINE
        ),
    ] = 1,
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
        bool, typer.Option(help=ENFORCE_EAGER_HELP, rich_help_panel=ENGINE)
    ] = False,
) -> None:
    """Run an OpenAI Batch API file (/v1/completions and /v1/chat/completions requests)
    through one engine and write one OpenAI batch result line per request, in order."""
    try:
        from tqdm import tqdm

        from tessellm.server.app import build_app
    except ImportError as exc:
        fail(f"run-batch needs the serve extra: pip install 'tessellm[serve]' ({exc})")
    from tessellm.config import EngineArgs
    from tessellm.errors import TessellmError

    items = read_items(input_file)
    names = list(served_model_name or [model])
    # Opened before the model loads, so that an unwritable path fails at once.
    try:
        sink = (
            contextlib.nullcontext(sys.stdout)
            if str(output_file) == "-"
            else output_file.open("w", encoding="utf-8")
        )
    except OSError as exc:
        fail(f"cannot write the output file {output_file}: {exc}", USER_ERROR)
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
            block_size=block_size,
            tensor_parallel_size=tensor_parallel_size,
            distributed_executor_backend=distributed_executor_backend,
            gpu_memory_utilization=gpu_memory_utilization,
            max_logprobs=max_logprobs,
            enforce_eager=enforce_eager,
            attention_backend=attention_backend,
            kv_cache_dtype=kv_cache_dtype,
            served_model_name=names[0],
        )
        progress_note(f"tessellm run-batch: loading {model} ...")
        engine = start_async_engine(args, data_parallel_size)
    except TessellmError as exc:
        sink.close()
        fail_with(exc)
    app = build_app(engine, names, model_root=model)
    in_flight = IN_FLIGHT_PER_SEQ * max_num_seqs * data_parallel_size
    with sink as out, tqdm(total=len(items), desc="run-batch", unit="req", file=sys.stderr) as bar:
        ok, failed = asyncio.run(run_lines(app, items, out, in_flight, bar))
    progress_note(f"tessellm run-batch: {ok} succeeded, {failed} failed -> {output_file}")
    if engine.dead is not None:
        fail(f"the engine stopped ({engine.dead}); the requests after that failed")
