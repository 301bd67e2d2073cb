"""Diagnostic: log each Triton kernel variant a process compiles; optionally, slow steps.

With this folder first on PYTHONPATH and TRITON_COMPILE_LOG naming a file, every Python
process appends one line per kernel-cache miss ("miss", before the compile or the disk-cache
load) and one per finished compile ("compiled"): epoch seconds, event, pid, and Triton's
description of the variant (kernel, options, each argument's specialisation). Lines after
a server's ready time are compiles some request waited for.
"""

import contextlib
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


# With TESSELLM_STEP_LOG naming a file, a tessellm process also logs each engine step that
# took longer than TESSELLM_STEP_LOG_MS (default 50): its end (epoch s), duration, and the
# plan launched in it (sequences, tokens, sequences with more than one token), with the
# scheduler's running and waiting counts. A stall then shows what the step held.
_STEP_LOG = os.environ.get("TESSELLM_STEP_LOG")


def _log_slow_steps() -> None:
    from tessellm.engine.llm_engine import LLMEngine

    slow_ms = float(os.environ.get("TESSELLM_STEP_LOG_MS", "50"))
    step, launch = LLMEngine.step, LLMEngine._launch
    plans: list[str] = []

    def logged_launch(self, plan, *args, **kwargs):
        prefills = sum(len(s.token_ids) > 1 for s in plan.seqs)
        plans.append(f"seqs={len(plan.seqs)} tokens={plan.num_batched_tokens} multi={prefills}")
        return launch(self, plan, *args, **kwargs)

    def logged_step(self):
        plans.clear()
        start = time.perf_counter()
        outputs = step(self)
        ms = (time.perf_counter() - start) * 1000
        if ms >= slow_ms:
            queue = f"running={len(self.scheduler.running)} waiting={len(self.scheduler.waiting)}"
            try:
                with open(_STEP_LOG, "a") as log:
                    log.write(f"{time.time():.3f} step {ms:.1f}ms {queue} {' | '.join(plans)}\n")
            except OSError:
                pass
        return outputs

    LLMEngine.step, LLMEngine._launch = logged_step, logged_launch


if _STEP_LOG:
    with contextlib.suppress(ImportError):  # not a tessellm environment
        _log_slow_steps()
