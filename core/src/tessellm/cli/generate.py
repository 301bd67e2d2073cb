"""``tessellm generate``: stream completions of one or more prompts to the terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tessellm.cli.common import (
    DOWNLOAD_DIR_HELP,
    KV_CACHE_DTYPE_HELP,
    MODEL_HELP,
    PIPELINE_HELP,
    REVISION_HELP,
    SPECULATIVE_CONFIG_HELP,
    EnforceEager,
    fail,
    fail_with,
)
from tessellm.config import DEFAULT_MODEL

DEFAULT_PROMPT = "Write a haiku about the sea."
# Prompts run as one batch up to this many at a time (larger batches on the CPU cost a
# one-off compile of their decode step, which a handful of prompts would not repay).
MAX_BATCH = 16
LABEL_WIDTH = 60


def read_prompts(prompts: list[str], input_file: Path | None) -> list[str]:
    """The positional prompts (``-``: all of standard input), then the file's non-empty
    lines; the default prompt when there are none."""
    result = [sys.stdin.read() if p == "-" else p for p in prompts]
    if input_file is not None:
        try:
            text = sys.stdin.read() if str(input_file) == "-" else input_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read --input-file {input_file}: {exc}", code=2)
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            fail(f"--input-file {input_file} has no prompt (one per line)", code=2)
        result.extend(lines)
    return result or [DEFAULT_PROMPT]


def label(number: int, prompt: str) -> str:
    """The line that introduces one prompt's output when there are several."""
    text = " ".join(prompt.split())
    if len(text) > LABEL_WIDTH:
        text = text[: LABEL_WIDTH - 3] + "..."
    return f"--- [{number}] {text}"


def stream_in_order(engine: Any, prompts: list[str], labelled: bool) -> None:
    """Run the engine until the requests named ``"0" .. str(len(prompts) - 1)`` finish,
    printing each one's text in order: the current prompt's as it is generated, a later
    one's (generated alongside) when its turn comes, each after its label if ``labelled``."""
    count = len(prompts)
    texts = [""] * count
    finished = [False] * count
    current, shown, started = 0, 0, False
    while True:
        while current < count:
            if not started:
                if labelled:
                    sys.stdout.write(label(current + 1, prompts[current]) + "\n")
                started = True
            piece = texts[current][shown:]
            sys.stdout.write(piece)
            shown += len(piece)
            if not finished[current]:
                break
            sys.stdout.write("\n")
            current, shown, started = current + 1, 0, False
        sys.stdout.flush()
        if current == count:
            return
        if not engine.has_unfinished_requests():  # nothing left to run (aborted)
            print(flush=True)
            return
        for out in engine.step():
            i = int(out.request_id)
            texts[i] = out.outputs[0].text
            finished[i] = out.finished


def generate(
    prompts: Annotated[
        list[str] | None,
        typer.Argument(
            help="Prompts, each generated in turn ('-': read one from standard input). "
            f"Default: {DEFAULT_PROMPT!r}.",
            show_default=False,
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input-file",
            "-f",
            help="A text file of prompts, one per line (blank lines skipped; '-': stdin).",
        ),
    ] = None,
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = DEFAULT_MODEL,
    max_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens to generate at most, per prompt.")
    ] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Nucleus sampling: draw from the smallest set of tokens whose probabilities "
            "add up to this (1: all).",
        ),
    ] = 1.0,
    top_k: Annotated[
        int,
        typer.Option(min=-1, help="Draw from the K most likely tokens only (0 or -1: all)."),
    ] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Apply the chat template if the model has one.")
    ] = True,
    system: Annotated[str | None, typer.Option(help="System message (chat mode).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Platform: auto, cpu, cuda ...")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(min=2)] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", "-tp", min=1)] = 1,
    pipeline_parallel_size: Annotated[
        int, typer.Option("--pipeline-parallel-size", "-pp", min=1, help=PIPELINE_HELP)
    ] = 1,
    distributed_executor_backend: Annotated[
        str | None,
        typer.Option(
            "--distributed-executor-backend",
            "--executor",
            help="How ranks run: mp (local processes, the default above one rank) or ray.",
        ),
    ] = None,
    enforce_eager: EnforceEager = False,
    kv_cache_dtype: Annotated[str, typer.Option(help=KV_CACHE_DTYPE_HELP)] = "auto",
    speculative_config: Annotated[
        str | None, typer.Option(help=SPECULATIVE_CONFIG_HELP, show_default=False)
    ] = None,
    revision: Annotated[str | None, typer.Option(help=REVISION_HELP)] = None,
    download_dir: Annotated[str | None, typer.Option(help=DOWNLOAD_DIR_HELP)] = None,
) -> None:
    """Generate text from each PROMPT and stream it to the terminal; with several prompts,
    each output follows a '--- [N] prompt' line."""
    from tessellm.config import EngineArgs
    from tessellm.engine.llm_engine import LLMEngine
    from tessellm.entrypoints.llm import apply_chat_template
    from tessellm.errors import TessellmError
    from tessellm.sampling_params import SamplingParams

    texts = read_prompts(list(prompts or []), input_file)
    labelled = len(texts) > 1
    # One-shot: a background build would be stopped at exit and never finish, so a missing
    # CPU decode library is built before decoding (once; later runs load it at start).
    os.environ.setdefault("TESSELLM_CPU_COMPILE", "wait")
    try:
        params = SamplingParams(
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_tokens=max_tokens
        )
        engine = LLMEngine(
            EngineArgs(
                model=model,
                dtype=dtype,
                device=device,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                pipeline_parallel_size=pipeline_parallel_size,
                distributed_executor_backend=distributed_executor_backend,
                max_num_seqs=min(len(texts), MAX_BATCH),
                enforce_eager=enforce_eager,
                kv_cache_dtype=kv_cache_dtype,
                speculative_config=speculative_config,
                revision=revision,
                download_dir=download_dir,
            )
        )
        tokenizer = engine.tokenizer
        use_template = chat and getattr(tokenizer, "chat_template", None)
        for i, text in enumerate(texts):
            inputs: str | list[int] = text
            if use_template:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": text}
                ]
                inputs = apply_chat_template(tokenizer, messages)
            engine.add_request(str(i), inputs, params)

        stream_in_order(engine, texts, labelled)
        engine.shutdown()
    except TessellmError as exc:
        fail_with(exc)
