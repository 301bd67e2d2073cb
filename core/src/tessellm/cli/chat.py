"""``tessellm chat``: an interactive terminal chat, streaming each reply as it is generated.

It runs a local engine, or talks to a running server (``--url``) over the OpenAI chat API
with nothing but the standard library, so the client needs no extra packages.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import typer

from tessellm.cli.common import MODEL_HELP, fail_with, progress_note
from tessellm.config import DEFAULT_MODEL

Message = dict[str, str]


class ChatError(Exception):
    """A reply could not be produced; the conversation goes on without it."""


@dataclass(slots=True)
class ReplyOptions:
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class ChatBackend(Protocol):
    name: str
    # Why the last reply ended ("stop", "length", ...), once its stream is exhausted.
    finish_reason: str | None

    def stream(self, messages: list[Message], options: ReplyOptions) -> Iterator[str]:
        """Yield the assistant's reply piece by piece."""
        ...


COMMANDS = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the system message stays)",
    "/exit": "quit (also /quit or Ctrl-D); Ctrl-C stops a reply",
}
TRUNCATED_MARK = " [truncated: max tokens]"


class RemoteChat:
    """A server's ``/v1/chat/completions`` with ``stream: true``."""

    def __init__(self, url: str, model: str | None, api_key: str | None) -> None:
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.api_key = api_key
        self.name = model or self._first_model()
        self.finish_reason: str | None = None

    def _open(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as exc:
            raise ChatError(f"HTTP {exc.code}: {_error_message(exc.read())}") from None
        except urllib.error.URLError as exc:
            raise ChatError(f"cannot reach {self.base}: {exc.reason}") from None

    def _first_model(self) -> str:
        with self._open("/models") as response:
            models = json.load(response).get("data") or []
        if not models:
            raise ChatError(f"{self.base} serves no model")
        return str(models[0]["id"])

    def stream(self, messages: list[Message], options: ReplyOptions) -> Iterator[str]:
        body = {
            "model": self.name,
            "messages": messages,
            "stream": True,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        self.finish_reason = None
        # Closing the response (also on Ctrl-C) drops the connection: the server aborts.
        with self._open("/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(_error_message(data.encode()))
                for choice in chunk.get("choices") or []:
                    self.finish_reason = choice.get("finish_reason") or self.finish_reason
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        yield piece


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:500] or "no details"


class LocalChat:
    """An engine in this process."""

    def __init__(self, engine: Any, name: str) -> None:
        self.engine = engine
        self.name = name
        self._ids = itertools.count()
        self.finish_reason: str | None = None

    def stream(self, messages: list[Message], options: ReplyOptions) -> Iterator[str]:
        from tessellm.entrypoints.llm import apply_chat_template
        from tessellm.errors import InvalidRequestError
        from tessellm.sampling_params import SamplingParams

        request_id = f"chat-{next(self._ids)}"
        self.finish_reason = None
        try:
            prompt = apply_chat_template(self.engine.tokenizer, messages)
            room = self.engine.max_model_len - len(prompt)
            params = SamplingParams(
                temperature=options.temperature,
                top_p=options.top_p,
                seed=options.seed,
                max_tokens=max(1, min(options.max_tokens, room)),
            )
            self.engine.add_request(request_id, prompt, params)
        except InvalidRequestError as exc:
            raise ChatError(str(exc)) from None
        shown = 0
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    text = out.outputs[0].text
                    if len(text) > shown:
                        yield text[shown:]
                        shown = len(text)
                    self.finish_reason = out.outputs[0].finish_reason
        finally:
            self.engine.abort_request(request_id)  # a no-op once finished; frees on Ctrl-C


def run_chat(backend: ChatBackend, system: str | None, options: ReplyOptions) -> None:
    """Read user turns from stdin until EOF or /exit, streaming each reply to stdout."""
    interactive = sys.stdin.isatty()
    start: list[Message] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    if interactive:
        print(f"Chatting with {backend.name}. /help lists commands, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(start)
            print("(conversation cleared)")
            continue
        if command == "/help":
            for name, what in COMMANDS.items():
                print(f"{name:8} {what}")
            continue
        history.append({"role": "user", "content": line})
        pieces: list[str] = []
        try:
            for piece in backend.stream(history, options):
                sys.stdout.write(piece)
                sys.stdout.flush()
                pieces.append(piece)
            if backend.finish_reason == "length":
                sys.stdout.write(TRUNCATED_MARK)  # shown, not kept in the history
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        except ChatError as exc:
            print(f"Error: {exc}", file=sys.stderr, flush=True)
            history.pop()
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(pieces)})


def chat(
    url: Annotated[
        str | None,
        typer.Option(help="A running server, e.g. http://127.0.0.1:8000 (else a local engine)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"With --url: the served model name (default: the server's first). "
            f"Without: {MODEL_HELP}",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="TESSELLM_API_KEY", help="Bearer key for --url.")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per reply.")] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    dtype: Annotated[str, typer.Option(help="Local engine: auto, float32 ...")] = "auto",
    device: Annotated[str, typer.Option(help="Local engine: auto, cpu, cuda ...")] = "auto",
    max_model_len: Annotated[int | None, typer.Option(min=2, help="Local engine.")] = None,
) -> None:
    """Chat with a model in the terminal (streaming), locally or against --url."""
    from tessellm.errors import TessellmError

    options = ReplyOptions(max_tokens, temperature, top_p, seed)
    try:
        backend: ChatBackend
        if url:
            backend = RemoteChat(url, model, api_key)
        else:
            from tessellm.config import EngineArgs
            from tessellm.engine.llm_engine import LLMEngine

            name = model or DEFAULT_MODEL
            progress_note(f"tessellm chat: loading {name} ...")
            args = EngineArgs(
                model=name, dtype=dtype, device=device, max_model_len=max_model_len, max_num_seqs=1
            )
            backend = LocalChat(LLMEngine(args), name)
    except (ChatError, TessellmError) as exc:
        fail_with(exc)
    with contextlib.suppress(KeyboardInterrupt):
        run_chat(backend, system, options)
