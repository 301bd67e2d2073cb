"""``tessellm generate``: stream one completion to the terminal."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tessellm.cli.common import MODEL_HELP, EnforceEager, fail
from tessellm.config import DEFAULT_MODEL


def generate(
    prompt: Annotated[str, typer.Argument(help="The prompt (read from stdin when '-').")] = (
        "Write a haiku about the sea."
    ),
    model: Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)] = DEFAULT_MODEL,
    max_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(min=-1)] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    chat: Annotated[
        bool, typer.Option("--chat/--no-chat", help="Apply the chat template if the model has one.")
    ] = True,
    system: Annotated[str | None, typer.Option(help="System message (chat mode).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="Platform: auto, cpu, cuda ...")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(min=2)] = None,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", "-tp", min=1)] = 1,
    distributed_executor_backend: Annotated[
        str | None,
        typer.Option(
            "--distributed-executor-backend",
            "--executor",
            help="How ranks run: mp (local processes, the default above one rank) or ray.",
        ),
    ] = None,
    enforce_eager: EnforceEager = False,
) -> None:
    """Generate text from PROMPT and stream it to the terminal."""
    from tessellm.config import EngineArgs
    from tessellm.engine.llm_engine import LLMEngine
    from tessellm.entrypoints.llm import apply_chat_template
    from tessellm.errors import TessellmError
    from tessellm.sampling_params import SamplingParams

    if prompt == "-":
        prompt = sys.stdin.read()
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
                distributed_executor_backend=distributed_executor_backend,
                max_num_seqs=1,
                enforce_eager=enforce_eager,
            )
        )
        tokenizer = engine.tokenizer
        inputs: str | list[int] = prompt
        if chat and getattr(tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            inputs = apply_chat_template(tokenizer, messages)
        engine.add_request("cli", inputs, params)
        shown = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                text = out.outputs[0].text
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write("\n")
        engine.shutdown()
    except TessellmError as exc:
        fail(str(exc))
