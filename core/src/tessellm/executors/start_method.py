"""How worker processes start: fork where that is safe, spawn otherwise (as vLLM does).

Fork starts a worker at once and needs nothing from the user's script. It is unsafe once
CUDA is initialised in this process (a forked child cannot use CUDA then) and on devices
other than CPUs and CUDA GPUs; there spawn is used, which starts a fresh interpreter that
re-runs the main script, so the script must keep its top-level work under
``if __name__ == "__main__":``. An unguarded script is refused before any process starts,
with what to do. ``TESSELLM_WORKER_MULTIPROC_METHOD=fork|spawn`` overrides the choice.

A forked child inherits two hazards from a parent that already ran threads:
``prepare_child`` and ``run_in_fresh_thread`` deal with them.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import ModuleType
from typing import Any

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError

START_METHOD_ENV = "TESSELLM_WORKER_MULTIPROC_METHOD"
START_METHODS = ("fork", "spawn")
# What a spawned child exits with when it finds itself starting workers while it re-runs
# an unguarded main script (the parent turns it into the same advice as the early check).
UNGUARDED_MAIN_EXIT_CODE = 86
# Devices whose runtime tolerates a fork before it is initialised.
FORKABLE_DEVICE_TYPES = ("cpu", "cuda")


def cuda_initialised() -> bool:
    """Whether this process has initialised CUDA, by torch or below it.

    ``torch.cuda.is_initialized()`` misses a driver that the CUDA runtime initialised
    without torch's lazy init (``torch.cuda.is_available()`` where NVML is missing, other
    libraries); a child forked after that cannot use CUDA either. The driver answers
    ``cuDeviceGetCount`` with CUDA_ERROR_NOT_INITIALIZED until ``cuInit`` has run, and asking
    initialises nothing.
    """
    import torch

    if torch.cuda.is_initialized():
        return True
    if not _library_loaded("libcuda.so"):
        return False
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return driver.cuDeviceGetCount(ctypes.byref(count)) == 0


def _library_loaded(name: str) -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps)
    except OSError:
        return False


def choose_start_method(device_type: str) -> tuple[str, str]:
    """The start method for workers on ``device_type`` devices, and why it was chosen."""
    requested = os.environ.get(START_METHOD_ENV, "").strip().lower()
    available = multiprocessing.get_all_start_methods()
    if requested:
        if requested not in START_METHODS:
            raise ConfigError(
                f"{START_METHOD_ENV}={requested!r} is not a start method tessellm uses; "
                f"choose one of {', '.join(START_METHODS)}"
            )
        if requested not in available:
            raise ConfigError(f"{START_METHOD_ENV}={requested} is not available on {sys.platform}")
        return requested, f"{START_METHOD_ENV}={requested}"
    if "fork" not in available or sys.platform == "darwin":
        # macOS's system frameworks are not fork-safe (Python's own default there is spawn).
        return "spawn", f"fork is not safe on {sys.platform}"
    if device_type not in FORKABLE_DEVICE_TYPES:
        return "spawn", f"{device_type} devices cannot be used from a forked process"
    if cuda_initialised():
        return "spawn", "CUDA is already initialised in this process"
    return "fork", "nothing in this process rules fork out"


def worker_context(args: EngineArgs, what: str) -> tuple[BaseContext, str]:
    """The multiprocessing context to start ``what`` (e.g. "tensor-parallel workers") with,
    and why that start method.

    Raises ``ConfigError`` when only spawn can be used and the main script would start
    them again in every child; exits at once (see ``UNGUARDED_MAIN_EXIT_CODE``) when this
    process is such a child.
    """
    exit_if_rerunning_main(what)
    from tessellm.plugins import get_plugins
    from tessellm.selection import choose_platform

    platform, _ = choose_platform(get_plugins(), args.device)
    method, why = choose_start_method(platform.device_type)
    if method == "spawn":
        check_main_survives_spawn(what, why)
    return multiprocessing.get_context(method), why


def start_process(proc: BaseProcess) -> None:
    """``proc.start()``. Python 3.12+ warns that a fork with threads alive may deadlock:
    intra-op pools always are; ``prepare_child`` and ``run_in_fresh_thread`` are the care
    that warning asks for."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*fork\(\) may lead to deadlocks", category=DeprecationWarning
        )
        proc.start()


# -- in the child ----------------------------------------------------------------------------
def prepare_child() -> None:
    """First thing in a worker process (main thread): signals as a worker needs them.

    A forked child inherits the parent's Python signal handlers and its wakeup fd (an
    asyncio loop's, in a server): a SIGTERM meant for the worker would wake the parent's
    loop as if the server had been told to stop. Ctrl-C is the parent's to handle.
    """
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(ValueError, OSError, TypeError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_in_fresh_thread(target: Callable[..., Any], *args: Any) -> None:
    """Run ``target(*args)`` in a new thread and wait for it.

    The thread a fork happens on carries the parent's OpenMP (libgomp) team into the
    child, whose pool threads do not exist there: the first parallel region (any torch op
    on more than one thread) would wait for them forever. A new thread builds a pool of
    its own. Spawned children run the same way, so both paths are the same code.
    """
    thread = threading.Thread(target=target, args=args, name="tessellm-worker-main")
    thread.start()
    thread.join()


def in_spawn_bootstrap() -> bool:
    """Whether this process is a spawned child still importing the parent's main module."""
    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def exit_if_rerunning_main(what: str) -> None:
    if not in_spawn_bootstrap():
        return
    sys.stderr.write(
        f"tessellm: this spawned process re-ran the main script up to where it starts {what} "
        "again; it stops here (its parent says what to do)\n"
    )
    sys.stderr.flush()
    os._exit(UNGUARDED_MAIN_EXIT_CODE)


# -- is the main script safe to re-run? ---------------------------------------------------
def unguarded_advice(what: str, why: str, where: str = "") -> str:
    """What to do when spawn would re-run the main script into starting ``what`` again."""
    if why.startswith(START_METHOD_ENV):
        other = f"set {START_METHOD_ENV}=fork"
    elif "CUDA" in why:
        other = (
            "start tessellm before anything in the script initialises CUDA, so that it can "
            "fork (torch.cuda.is_available() does, unless PYTORCH_NVML_BASED_CUDA_CHECK=1)"
        )
    else:
        other = f"set {START_METHOD_ENV}=fork if forking is safe here"
    return (
        f"{what} start with 'spawn' here ({why}), which runs the main script again in every "
        f"new process{where}, starting them again there. Put the script's top-level code "
        f'under `if __name__ == "__main__":`, or {other}.'
    )


def check_main_survives_spawn(what: str, why: str) -> None:
    """Raise ``ConfigError`` if a spawned child would re-run the main script's code that is
    starting ``what`` right now (top-level code outside an ``if __name__`` guard)."""
    main = sys.modules.get("__main__")
    path = main_path_rerun_by_spawn(main)
    if path is None:
        return
    line = unguarded_line(main, path)
    if line is not None:
        raise ConfigError(unguarded_advice(what, why, f": {path} line {line} would run"))


def main_path_rerun_by_spawn(main: ModuleType | None) -> str | None:
    """The main script's file if spawn re-runs it in each child (as ``spawn.prepare``
    decides: not for ``python -c``, a REPL, a package's ``__main__`` or IPython)."""
    if main is None:
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return None
    path = getattr(main, "__file__", None)
    if not path or os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    return path


def unguarded_line(main: ModuleType | None, path: str) -> int | None:
    """The main script's top-level line running now, if no ``if __name__`` guard holds it;
    None when the script is guarded there, not running its top level, or unreadable."""
    namespace = getattr(main, "__dict__", None)
    frame = sys._getframe()
    line = None
    while frame is not None:
        if frame.f_globals is namespace and frame.f_code.co_name == "<module>":
            line = frame.f_lineno
        frame = frame.f_back
    if line is None:
        return None
    try:
        with open(path, "rb") as source:
            tree = ast.parse(source.read())
    except (OSError, SyntaxError, ValueError):
        return None
    return None if line_is_guarded(tree, line) else line


def line_is_guarded(tree: ast.Module, line: int) -> bool:
    """Whether an ``if`` that tests ``__name__`` keeps ``line`` from running when spawn
    re-runs the script as ``__mp_main__`` (a test it cannot evaluate counts as a guard)."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.If) or not _tests_name(node.test):
            continue
        in_body = _spans(node.body, line)
        if not in_body and not _spans(node.orelse, line):
            continue
        runs = _value_in_spawned_child(node.test)
        if runs is None or runs != in_body:
            return True
    return False


def _tests_name(test: ast.expr) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__name__" for n in ast.walk(test))


def _spans(block: list[ast.stmt], line: int) -> bool:
    return any(s.lineno <= line <= (s.end_lineno or s.lineno) for s in block)


GUARD_NODES = (
    ast.Expression,
    ast.Compare,
    ast.BoolOp,
    ast.UnaryOp,
    ast.Name,
    ast.Constant,
    ast.Tuple,
    ast.Load,
    ast.cmpop,
    ast.boolop,
    ast.Not,
)


def _value_in_spawned_child(test: ast.expr) -> bool | None:
    """The guard's truth with ``__name__ == "__mp_main__"``; None unless it is built from
    ``__name__``, constants, comparisons and boolean operators alone."""
    expression = ast.Expression(test)
    for node in ast.walk(expression):
        if not isinstance(node, GUARD_NODES) or (
            isinstance(node, ast.Name) and node.id != "__name__"
        ):
            return None
    try:
        code = compile(expression, "<guard>", "eval")
        return bool(eval(code, {"__builtins__": {}}, {"__name__": "__mp_main__"}))
    except Exception:
        return None
