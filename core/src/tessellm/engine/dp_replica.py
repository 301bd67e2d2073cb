"""Data-parallel replicas: each a whole ``LLMEngine`` in its own process, driven over pipes.

``ReplicaProcesses`` is the front's side (start, send, receive, stop); ``replica_main`` is
what runs in each replica process.

The front (``dp_engine.DataParallelEngine``) sends commands: ``("add", call_id, request_id,
prompt, params, priority)``, ``("abort", request_ids)`` and ``("shutdown",)``. The replica
answers ``("ready", info)`` once, ``("reply", call_id, error)`` for every add (``None`` when
accepted), ``("outputs", outputs, stats)`` after each step and ``("stats", stats)`` after
commands alone; ``("error", text)`` if its loop fails. A reader thread drains the command
pipe continuously so the front never blocks on a replica busy in a long step.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from tessellm.config import EngineArgs
from tessellm.errors import TessellmError, WorkerError
from tessellm.executors.mp import exit_description, exit_when_parent_dies, reap_processes
from tessellm.executors.start_method import (
    UNGUARDED_MAIN_EXIT_CODE,
    prepare_child,
    run_in_fresh_thread,
    start_process,
    unguarded_advice,
    worker_context,
)
from tessellm.executors.worker import STARTUP_TIMEOUT_ENV

STOP_GRACE_S = 10.0


@dataclass(slots=True)
class ReplicaConfig:
    index: int
    args: EngineArgs
    # For CUDA: the devices this replica may use (its slice of the machine's GPUs).
    visible_devices: str | None = None
    # For CPU: the cores' share of this replica (None: as the environment says).
    cpu_threads: int | None = None


def _send_error(out: Connection, text: str) -> None:
    with contextlib.suppress(OSError):
        out.send(("error", text))


def _picklable(exc: BaseException) -> TessellmError:
    # The front re-raises it in the request's handler: keep the type where it is ours.
    return exc if isinstance(exc, TessellmError) else TessellmError(f"{type(exc).__name__}: {exc}")


def replica_main(config: ReplicaConfig, commands: Connection, out: Connection) -> None:
    """A replica process's whole life."""
    prepare_child()  # Ctrl-C is the front's to handle; the parent's handlers are not ours
    exit_when_parent_dies()
    run_in_fresh_thread(_run_replica, config, commands, out)


def _run_replica(config: ReplicaConfig, commands: Connection, out: Connection) -> None:
    if config.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = config.visible_devices
    if config.cpu_threads is not None:
        import torch

        # The platform then leaves threads alone, and this replica's tensor-parallel
        # workers inherit the setting: all replicas together use each core once.
        ranks = config.args.tensor_parallel_size * config.args.pipeline_parallel_size
        threads = max(1, config.cpu_threads // ranks)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    code = 0
    engine = None
    try:
        from tessellm.engine.llm_engine import LLMEngine

        engine = LLMEngine(config.args)
        out.send(
            (
                "ready",
                {
                    "pid": os.getpid(),
                    "max_model_len": engine.max_model_len,
                    "stats": engine.stats(),
                    "describe": engine.describe(),
                },
            )
        )
        _serve(engine, commands, out)
    except Exception:
        code = 1
        _send_error(out, traceback.format_exc())
    finally:
        if engine is not None:
            engine.shutdown()  # stops this replica's tensor-parallel workers, if any
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _serve(engine: Any, commands: Connection, out: Connection) -> None:
    inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    wakeup = threading.Event()

    def read() -> None:
        while True:
            try:
                message = commands.recv()
            except (EOFError, OSError):
                message = ("shutdown",)  # the front is gone
            inbox.put(message)
            wakeup.set()
            if message[0] == "shutdown":
                return

    threading.Thread(target=read, name="replica-commands", daemon=True).start()
    while True:
        handled = False
        while True:
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            handled = True
            kind = message[0]
            if kind == "shutdown":
                return
            if kind == "add":
                _, call_id, request_id, prompt, params, priority = message
                try:
                    engine.add_request(request_id, prompt, params, priority)
                    error = None
                except Exception as exc:
                    error = _picklable(exc)
                out.send(("reply", call_id, error))
            elif kind == "abort":
                engine.abort_request(message[1])
        if engine.has_unfinished_requests():
            out.send(("outputs", engine.step(), engine.stats()))
        else:
            if handled:
                out.send(("stats", engine.stats()))
            wakeup.wait()
            wakeup.clear()


def _stop(
    procs: list[BaseProcess], commands: list[Connection], inboxes: list[Connection], grace: float
) -> None:
    for conn in commands:
        with contextlib.suppress(OSError):
            conn.send(("shutdown",))
    reap_processes(procs, grace)
    for conn in commands + inboxes:
        conn.close()
    procs.clear()
    commands.clear()
    inboxes.clear()


class ReplicaProcesses:
    """The front's handle on the replica processes: one command and one output pipe each."""

    def __init__(
        self, args: EngineArgs, devices: list[str | None], cpu_threads: int | None = None
    ) -> None:
        ctx, self._start_reason = worker_context(args, "data-parallel replicas")
        self._lock = threading.Lock()
        self.procs: list[BaseProcess] = []
        self.commands: list[Connection] = []
        self.inboxes: list[Connection] = []
        # Stops the replicas if the front is dropped without stop(), or at exit.
        self._finalizer = weakref.finalize(
            self, _stop, self.procs, self.commands, self.inboxes, STOP_GRACE_S
        )
        for index, visible in enumerate(devices):
            commands_theirs, commands_ours = ctx.Pipe(duplex=False)
            inbox_ours, inbox_theirs = ctx.Pipe(duplex=False)
            # Not a daemon: a replica may start its own tensor-parallel workers.
            proc = ctx.Process(
                target=replica_main,
                args=(
                    ReplicaConfig(index, args, visible, cpu_threads),
                    commands_theirs,
                    inbox_theirs,
                ),
                name=f"tessellm-dp{index}",
            )
            start_process(proc)
            commands_theirs.close()
            inbox_theirs.close()
            self.procs.append(proc)
            self.commands.append(commands_ours)
            self.inboxes.append(inbox_ours)

    def __len__(self) -> int:
        return len(self.procs)

    def wait_ready(self, timeout: float) -> list[dict[str, Any]]:
        """Every replica's ready info; ``WorkerError`` if one fails, dies or is too slow."""
        infos: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(infos) < len(self):
            remaining = deadline - time.monotonic()
            waiting = [i for i in range(len(self)) if i not in infos]
            if remaining <= 0:
                raise WorkerError(
                    f"data-parallel replica(s) {waiting} did not start within {timeout:.0f} s "
                    f"(raise {STARTUP_TIMEOUT_ENV} if that is expected)"
                )
            index_of = {self.inboxes[i]: i for i in waiting}
            index_of.update({self.procs[i].sentinel: i for i in waiting})
            for ready in wait(list(index_of), timeout=remaining):
                index = index_of[ready]
                if index in infos:
                    continue
                message = self.receive(index)
                if message[0] != "ready":
                    raise WorkerError(
                        f"data-parallel replica {index} failed to start:\n{message[1]}"
                    )
                infos[index] = message[1]
        return [infos[i] for i in range(len(self))]

    def receive(self, index: int) -> tuple[Any, ...]:
        """The replica's next message, or ``("error", why)`` when it has died instead."""
        try:
            if self.inboxes[index].poll():
                return self.inboxes[index].recv()
        except (EOFError, OSError):
            pass
        proc = self.procs[index]
        proc.join(1.0)
        if proc.exitcode == UNGUARDED_MAIN_EXIT_CODE:
            return ("error", unguarded_advice("data-parallel replicas", self._start_reason))
        return (
            "error",
            f"data-parallel replica {index} (pid {proc.pid}) {exit_description(proc.exitcode)}",
        )

    def send(self, index: int, message: tuple[Any, ...]) -> None:
        self.commands[index].send(message)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        with self._lock:  # the front's shutdown and its reader thread may both stop us
            self._finalizer.detach()
            _stop(self.procs, self.commands, self.inboxes, grace)
