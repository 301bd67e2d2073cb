"""Diagnostic: log each Triton kernel variant a process compiles, with wall-clock times.

With this folder first on PYTHONPATH and TRITON_COMPILE_LOG naming a file, every Python
process appends one line per kernel-cache miss ("miss", before the compile or the disk-cache
load) and one per finished compile ("compiled"): epoch seconds, event, pid, and Triton's
description of the variant (kernel, options, each argument's specialisation). Lines after
a server's ready time are compiles some request waited for.
"""

import os
import time

_LOG = os.environ.get("TRITON_COMPILE_LOG")


def _hook(event: str):
    def hook(*_: object, **kwargs: object) -> bool:
        try:
            with open(_LOG, "a") as log:
                log.write(f"{time.time():.3f} {event} {os.getpid()} {kwargs.get('repr')}\n")
        except OSError:  # a diagnostic must not fail the launch
            pass
        return False  # True would tell Triton to skip the compile

    return hook


if _LOG:
    try:
        from triton import knobs
    except ImportError:  # a Triton without knobs: nothing to log
        knobs = None
    if knobs is not None:
        knobs.runtime.jit_cache_hook = _hook("miss")
        if hasattr(knobs.runtime, "jit_post_compile_hook"):
            knobs.runtime.jit_post_compile_hook = _hook("compiled")
