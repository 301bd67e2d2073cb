"""Building compiled decode libraries in a child process while the engine serves.

Export and AOTInductor compilation are mostly Python (tracing, lowering, code
generation) plus C++ compiler processes. In a thread of the serving process they would
hold the GIL for a minute or more, against an eager decode step that gives the GIL up
and takes it back around each of its ~2,300 small torch ops; worse, a non-strict export
turns ``torch.compiler.is_compiling()`` on for the whole process, which sends the serving
thread's attention down its traced path (tried: every request failed while a trace ran).
So the model goes to a child process instead: pickled with every parameter, buffer and
KV cache replaced by its storage layout, shape, dtype and strides (the library takes them
as inputs, so their values do not matter; any other tensor, which a trace could bake in
as a constant, goes by value). The child exports and compiles there, at a lower CPU
priority, writes each library into the cache and reports progress as JSON lines on a
pipe; the parent loads a finished library with the C++ loader (milliseconds).

The child belongs to its parent: it runs in a process group of its own, with its
compilers, which the parent kills (SIGKILL) when it exits or is interrupted; and it kills
that group itself when its stdin, the parent's pipe, reaches end of file (the parent was
killed outright). One build runs at a time per cache directory (a lock file): the cores
are shared, and a second process wanting the same library finds it built.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Block count of the child's stand-in KV caches: the dimension is dynamic, and a value
# unlike the other example sizes (2 or 18 sequences, 3 blocks a row) keeps the exporter
# from unifying the dimensions.
KV_EXAMPLE_BLOCKS = 7
BUILD_NICENESS = 10  # below the serving process on shared cores
logger = logging.getLogger(__name__)


# -- the model, without its weights ----------------------------------------------------
def _function_address(func: types.FunctionType) -> tuple | None:
    """Where a lambda or local function is reachable from its module: a module global, or
    an entry of a dict, list or tuple there (an activation table's lambdas). Pickle finds
    module-level functions by name itself, these not."""
    module = sys.modules.get(func.__module__ or "")
    for name, value in vars(module).items() if module else ():
        if value is func:
            return ("global", func.__module__, name, None)
        items = value.items() if isinstance(value, dict) else ()
        if isinstance(value, (list, tuple)):
            items = enumerate(value)
        for key, item in items:
            if item is func and isinstance(key, (str, int)):
                return ("item", func.__module__, name, key)
    return None


def serialize_model(model: Any, kv_caches: list[Any]) -> bytes:
    """``model`` pickled with its parameters, buffers and ``kv_caches`` as layouts only."""
    import torch
    from torch import nn

    from tessellm.interfaces.ops import FusedOps

    kinds: dict[int, str] = {id(t): "weight" for t in model.parameters()}
    kinds.update({id(t): "weight" for t in model.buffers()})
    kinds.update({id(t): "kv" for t in kv_caches})
    numbers: dict[int, int] = {}  # tensor object -> its number (ties stay one object)
    storages: dict[int, int] = {}  # storage address -> its number (views share one)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> tuple | None:
            # A fused-op table is unbound while exporting anyway (it branches on values).
            if isinstance(obj, FusedOps):
                return ("none",)
            if isinstance(obj, types.FunctionType) and "<" in obj.__qualname__:
                return _function_address(obj)  # None: pickle then says why it cannot
            if not isinstance(obj, torch.Tensor) or id(obj) not in kinds:
                return None
            number = numbers.setdefault(id(obj), len(numbers))
            if kinds[id(obj)] == "kv":
                return ("kv", number, (KV_EXAMPLE_BLOCKS, *obj.shape[1:]), obj.dtype)
            storage = obj.untyped_storage()
            address = storage.data_ptr() or -1 - number  # empty storages: one each
            return (
                "tensor",
                number,
                storages.setdefault(address, len(storages)),
                storage.nbytes(),
                obj.storage_offset(),
                tuple(obj.shape),
                tuple(obj.stride()),
                obj.dtype,
                isinstance(obj, nn.Parameter),
                obj.requires_grad,
            )

    buffer = io.BytesIO()
    Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(model)
    return buffer.getvalue()


def deserialize_model(blob: bytes) -> Any:
    """The model of :func:`serialize_model`, its weights and caches uninitialised memory
    (allocated, never touched: the export reads layouts only)."""
    import torch
    from torch import nn

    tensors: dict[int, torch.Tensor] = {}
    storages: dict[int, torch.UntypedStorage] = {}

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: tuple) -> object:
            if pid[0] == "none":
                return None
            if pid[0] in ("global", "item"):
                _, module, name, key = pid
                value = getattr(importlib.import_module(module), name)
                return value if pid[0] == "global" else value[key]
            number = pid[1]
            if number in tensors:
                return tensors[number]
            if pid[0] == "kv":
                tensor = torch.empty(pid[2], dtype=pid[3])
            else:
                _, _, index, nbytes, offset, shape, stride, dtype, parameter, grad = pid
                storage = storages.setdefault(index, torch.UntypedStorage(nbytes))
                tensor = torch.empty(0, dtype=dtype).set_(storage, offset, shape, stride)
                if parameter:
                    tensor = nn.Parameter(tensor, requires_grad=grad)
            tensors[number] = tensor
            return tensor

    return Unpickler(io.BytesIO(blob)).load()


# -- the parent's side -----------------------------------------------------------------
_LIVE: weakref.WeakSet[BuildProcess] = weakref.WeakSet()


def child_command() -> list[str]:
    """How the build process starts: this module, by the running interpreter."""
    return [sys.executable, "-m", __name__]


class BuildProcess:
    """A child process building the libraries that ``payload`` lists.

    ``on_event`` is called from a reader thread with each event the child reports, then
    with ``{"event": "exit", "returncode": ...}``. The child is killed, with everything it
    started, by :meth:`kill`, at interpreter exit, or when this process dies.
    """

    def __init__(
        self,
        payload: dict[str, Any],
        log_path: Path,
        on_event: Callable[[dict], None],
        description: str = "compiled decode steps",
    ) -> None:
        self.owner = os.getpid()  # a forked copy of this object must not kill the build
        self.description = description  # what it builds, for the note at exit
        self.started = time.monotonic()
        self.killed = False  # by kill(): an end, not a failure
        self.log_path = log_path
        self.done = threading.Event()
        # Inductor's pool of compile workers would be more processes for one core's work.
        env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                child_command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # its own process group: killed as one
                env=env,
            )
        _LIVE.add(self)
        blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        self._reader = threading.Thread(
            target=self._pump, args=(blob, on_event), name="tessellm-decode-build", daemon=True
        )
        self._reader.start()

    def _pump(self, blob: bytes, on_event: Callable[[dict], None]) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(len(blob).to_bytes(8, "big") + blob)
            self.proc.stdin.flush()  # stdin stays open: its end tells the child we are gone
        except (BrokenPipeError, ValueError):  # it died early (or was killed): see exit
            pass
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                on_event(json.loads(line))
        on_event({"event": "exit", "returncode": self.proc.wait()})
        self.done.set()

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Stop the build and every compiler it started; returns within milliseconds."""
        if os.getpid() != self.owner:
            return
        if self.running() and not self.killed:
            logger.warning(
                "stopped building %s, %.0f s in (the next start builds again; "
                "TESSELLM_CPU_COMPILE=wait builds before serving)",
                self.description,
                time.monotonic() - self.started,
            )
        self.killed = True
        # Only while the child is unreaped: its pid (the group's id) cannot be reused.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=1)
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(OSError):  # a stopped build's log says nothing useful
            self.log_path.unlink()


@atexit.register
def _kill_builds() -> None:
    for build in list(_LIVE):
        build.kill()


# -- the child's side ------------------------------------------------------------------
def _read_exactly(fd: int, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the parent closed the pipe before sending the whole payload")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _watch_parent(fd: int) -> None:
    """Kill this build's process group (compilers included) when the parent is gone.

    Reads the raw descriptor: a daemon thread blocked inside a buffered reader would
    abort the interpreter's shutdown."""
    while os.read(fd, 4096):
        pass
    os.killpg(os.getpgrp(), signal.SIGKILL)


@contextlib.contextmanager
def _build_lock(directory: Path, emit: Callable[..., None]):
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".build.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            emit("waiting")  # another process builds in this cache
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def main() -> int:
    # The payload first, before importing torch: the parent's write never waits long.
    size = int.from_bytes(_read_exactly(0, 8), "big")
    payload = pickle.loads(_read_exactly(0, size))
    threading.Thread(target=_watch_parent, args=(0,), daemon=True).start()
    # Events go to the pipe; anything else printed goes to the log (stderr).
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(event: str, **fields: object) -> None:
        events.write(json.dumps({"event": event, **fields}) + "\n")

    os.nice(payload["niceness"])
    sys.path[:0] = [p for p in payload["sys_path"] if p not in sys.path]
    import torch

    torch.set_num_threads(payload["threads"])  # the generated code's thread count
    for name in payload["modules"]:  # registrations a trace may need (custom ops)
        with contextlib.suppress(Exception):
            importlib.import_module(name)
    from tessellm_cpu import cache_store
    from tessellm_cpu.decode_step import compile_library, export_decode_step

    model = deserialize_model(payload["model"])
    cache_dir = Path(payload["cache_dir"])
    keep = frozenset(Path(p) for p in payload["keep"])
    with _build_lock(cache_store.compiled_dir(cache_dir), emit):
        for job in payload["jobs"]:
            batch_range, path = tuple(job["batch_range"]), Path(job["path"])
            query_len = int(job.get("query_len", 1))
            shape = {"batch_range": batch_range, "query_len": query_len}
            if path.exists():  # built by another process meanwhile
                emit("built", **shape, cached=True)
                continue
            emit("exporting", **shape)
            start = time.monotonic()
            try:
                with torch.no_grad():
                    program = export_decode_step(model, batch_range, query_len)
                exported = time.monotonic()
                emit("exported", **shape, seconds=exported - start)
                compile_library(program, path)
            except Exception as exc:
                import traceback

                traceback.print_exc()
                first_line = (str(exc).splitlines() or [""])[0][:300]
                reason = f"{type(exc).__name__}: {first_line}"
                emit("failed", **shape, reason=reason)
                return 1
            cache_store.write_sidecar(path, payload["model_name"], batch_range, query_len=query_len)
            end = time.monotonic()
            emit(
                "built",
                **shape,
                export_seconds=exported - start,
                compile_seconds=end - exported,
                bytes=path.stat().st_size,
            )
            cache_store.prune(cache_dir, payload["max_cache_bytes"], keep)
    return 0


def last_log_line(path: Path) -> str:
    """The last line a failed build wrote (usually its exception), for the warning."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:  # whatever it is, the log gets it and the parent the exit code
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter shutdown: the watchdog thread is still reading
