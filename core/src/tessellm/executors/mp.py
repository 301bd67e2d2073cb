"""The multi-process executor: one local process per tensor-parallel rank.

Workers are forked where that is safe and spawned otherwise (``start_method`` decides, and
refuses a main script that spawn would re-run into starting workers again).

The driver (the engine's process) keeps the scheduler and joins no process group; it sends
each call to every rank over its own ``multiprocessing`` pipe and waits for all replies
while also watching the processes themselves, so a worker that dies is noticed at once
instead of after a collective times out. A step that raised on a rank comes back as a
``RaisedInStep`` reply (``executors/base.py`` says when that is not fatal). Workers ignore
Ctrl-C (the driver stops them) and exit by themselves when the driver process goes away.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from tessellm.config import EngineArgs
from tessellm.executors.base import DistributedExecutor, deadline_after_raise
from tessellm.executors.start_method import (
    UNGUARDED_MAIN_EXIT_CODE,
    prepare_child,
    run_in_fresh_thread,
    start_process,
    unguarded_advice,
    worker_context,
)
from tessellm.executors.worker import (
    EXECUTE_TIMEOUT_ENV,
    STARTUP_TIMEOUT_ENV,
    RaisedInStep,
    Worker,
    WorkerConfig,
    execute_timeout,
    free_port,
    startup_timeout,
)
from tessellm.model_loader import ResolvedModel

WORKER_CALLS = frozenset({"available_blocks", "initialize_cache", "execute", "sleep", "wake_up"})
CLOSE = "close"
# How long workers get to leave on their own before they are terminated.
CLOSE_GRACE_S = 5.0


def exit_when_parent_dies() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(config: WorkerConfig, conn: Connection) -> None:
    """A worker process's whole life: start, answer calls until told to close."""
    prepare_child()  # Ctrl-C is the driver's to handle; the parent's handlers are not ours
    exit_when_parent_dies()
    run_in_fresh_thread(_serve_driver, config, conn)


def _serve_driver(config: WorkerConfig, conn: Connection) -> None:
    code = 0
    try:
        worker = Worker(config)
        conn.send(("ok", worker.ready_info()))
        while True:
            try:
                method, args = conn.recv()
            except EOFError:
                break  # the driver is gone
            if method == CLOSE:
                worker.close()
                break
            if method not in WORKER_CALLS:
                raise ValueError(f"unknown worker call {method!r}")
            conn.send(("ok", getattr(worker, method)(*args)))
    except Exception:
        code = 1
        # The peers may be stuck in a collective now; the driver stops them all.
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    # Interpreter teardown after torch.distributed can take seconds (native destructors);
    # nothing is left to clean up, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reap_processes(procs: list[BaseProcess], grace: float) -> None:
    """Wait for processes already asked to exit, ``grace`` seconds for all of them; then
    terminate what is left, and kill what has not exited 2 seconds after that."""
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _stop_processes(procs: list[BaseProcess], conns: list[Connection], grace: float) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send((CLOSE, ()))
    reap_processes(procs, grace)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()


def exit_description(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (often the system running out of memory)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class MultiprocExecutor(DistributedExecutor):
    name = "mp"

    def _start(self, args: EngineArgs, resolved: ResolvedModel) -> list[dict[str, Any]]:
        ctx, self._start_reason = worker_context(args, "tensor-parallel workers")
        self.start_method: str = ctx.get_start_method()
        world = self.world_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        # Stops the workers if the engine is dropped without shutdown(), or at exit.
        self._finalizer = weakref.finalize(
            self, _stop_processes, self._procs, self._conns, CLOSE_GRACE_S
        )
        for rank in range(world):
            config = WorkerConfig(
                args,
                resolved,
                rank=rank,
                world_size=world,
                init_method=init_method,
                local_rank=rank,
                local_world_size=world,
                collective_timeout_s=execute_timeout(),
            )
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main, args=(config, theirs), name=f"tessellm-tp{rank}", daemon=True
            )
            try:
                start_process(proc)
            except BaseException:
                self._stop_workers()
                raise
            theirs.close()  # so the driver sees EOF when the worker's end closes
            self._procs.append(proc)
            self._conns.append(ours)
        try:
            return self._collect("start-up", startup_timeout(), STARTUP_TIMEOUT_ENV)
        except BaseException:
            self._stop_workers()
            raise

    def describe(self) -> dict[str, str]:
        return {**super().describe(), "start_method": self.start_method}

    def _call_all(self, method: str, args: tuple[Any, ...], timeout: float) -> list[Any]:
        self._post_all(method, args)
        return self._collect(method, timeout, EXECUTE_TIMEOUT_ENV)

    def _post_all(self, method: str, args: tuple[Any, ...]) -> None:
        # Pipelined steps queue in each rank's socket buffer (hundreds of KiB) until read.
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args))
            except OSError:
                self._fail(self._death_message(rank, method))

    def _collect_posted(self, method: str) -> list[Any]:
        return self._collect(method, execute_timeout(), EXECUTE_TIMEOUT_ENV)

    def _collect(self, what: str, timeout: float, timeout_env: str) -> list[Any]:
        """Every rank's reply, or ``_fail`` on the first error, death or the deadline."""
        results: list[Any] = [None] * len(self._conns)
        rank_of: dict[Any, int] = {}
        for rank, (proc, conn) in enumerate(zip(self._procs, self._conns, strict=True)):
            rank_of[conn] = rank
            rank_of[proc.sentinel] = rank
        pending = set(range(len(self._conns)))
        started = time.monotonic()
        deadline = started + timeout
        raised: RaisedInStep | None = None
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if raised is not None:
                    self._fail_out_of_step(raised, sorted(pending), what)
                self._fail(
                    f"worker rank(s) {sorted(pending)} did not finish {what} within "
                    f"{timeout:.0f} s (raise {timeout_env} if that is expected)"
                )
            for ready in wait(list(rank_of), timeout=remaining):
                rank = rank_of[ready]
                conn = self._conns[rank]
                # A worker that raised sends its traceback and then exits: read it first.
                if rank in pending and conn.poll():
                    try:
                        status, payload = conn.recv()
                    except (EOFError, OSError):
                        self._fail(self._death_message(rank, what))
                    if status == "error":
                        pid = self._procs[rank].pid
                        self._fail(f"worker rank {rank} (pid {pid}) raised in {what}:\n{payload}")
                    results[rank] = payload
                    pending.discard(rank)
                    del rank_of[conn]
                    if raised is None and isinstance(payload, RaisedInStep):
                        raised = payload
                        deadline = deadline_after_raise(started, deadline)
                elif ready is self._procs[rank].sentinel:
                    self._fail(self._death_message(rank, what))
        return results

    def _death_message(self, rank: int, what: str) -> str:
        proc = self._procs[rank]
        proc.join(1.0)
        if proc.exitcode == UNGUARDED_MAIN_EXIT_CODE:
            return unguarded_advice("tensor-parallel workers", self._start_reason)
        return (
            f"worker rank {rank} (pid {proc.pid}) {exit_description(proc.exitcode)} during "
            f"{what}; all {self.world_size} workers were stopped"
        )

    def _stop_workers(self) -> None:
        grace = 0.0 if self._failure is not None else CLOSE_GRACE_S
        _stop_processes(self._procs, self._conns, grace)
