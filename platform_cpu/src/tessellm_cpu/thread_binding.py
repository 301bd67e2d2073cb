"""A core each for the thread that runs steps and its OpenMP workers.

The server runs steps on a thread of its own (``AsyncLLMEngine``). libgomp gives such a
thread a team of its own, and once that team has slept (a server between requests), the
kernel kept placing master and worker on one core: on a 2-core EPYC every op of the next
step ran at about 60 % speed (a 30-token prefill 136 instead of 108 ms; the 30 layers'
GEMMs alone 103 instead of 76 ms), where the process's main thread (``LLM.generate``)
kept its speed. Binding each member of that team to a core of its own, as vLLM's
``VLLM_CPU_OMP_THREADS_BIND`` does, keeps it. The main thread is left unbound by default:
every thread it starts later (tokenizer pools, a user's own) would inherit the binding.

``TESSELLM_CPU_OMP_THREADS_BIND``: ``auto`` (default: step threads other than the main
thread, one core each), ``nobind``, or a CPU list (``0-3``, ``0,2,4,6``) used for any
step thread, main included.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BIND_ENV = "TESSELLM_CPU_OMP_THREADS_BIND"
CPU_SYSFS = Path("/sys/devices/system/cpu")
_TASKS = Path("/proc/self/task")
# Elements enough that at::parallel_for splits the op over every thread (its grain is 32768).
_PARALLEL_NUMEL = 1 << 18


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ValueError for anything else."""
    cpus: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        first, last = int(low), int(high or low)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.extend(range(first, last + 1))
    return list(dict.fromkeys(cpus))


def one_cpu_per_core(allowed: set[int]) -> list[int]:
    """The allowed CPUs, one per physical core (hyper-threads share a core's vector units)."""
    chosen: dict[tuple[str, str], int] = {}
    for cpu in sorted(allowed):
        topology = CPU_SYSFS / f"cpu{cpu}" / "topology"
        try:
            key = (
                (topology / "physical_package_id").read_text().strip(),
                (topology / "core_id").read_text().strip(),
            )
        except OSError:
            key = ("", str(cpu))
        chosen.setdefault(key, cpu)
    return sorted(chosen.values())


def _thread_ids() -> set[int]:
    return {int(name) for name in os.listdir(_TASKS)}


def read_setting() -> str | list[int]:
    """``TESSELLM_CPU_OMP_THREADS_BIND`` as ``"auto"``, ``"nobind"`` or a CPU list; a
    ConfigError naming the variable for anything else (read at process set-up, so a
    typo stops the start, not a request)."""
    setting = os.environ.get(BIND_ENV, "auto").strip().lower() or "auto"
    if setting in ("auto", "nobind"):
        return setting
    from tessellm.errors import ConfigError

    try:
        cpus = parse_cpu_list(setting)
    except ValueError:
        raise ConfigError(
            f"{BIND_ENV} must be auto, nobind or a CPU list such as 0-3, got {setting!r}"
        ) from None
    outside = sorted(set(cpus) - os.sched_getaffinity(0))
    if outside:
        raise ConfigError(f"{BIND_ENV} names CPUs this process may not use: {outside}")
    return cpus


def bind_step_thread(setting: str | list[int]) -> list[int]:
    """Bind the calling thread and its OpenMP workers to a CPU each as ``setting``
    (:func:`read_setting`) says; the CPUs used (master first), or [] where nothing was
    bound."""
    if setting == "nobind" or not hasattr(os, "sched_setaffinity") or not _TASKS.is_dir():
        return []
    if setting == "auto":
        if threading.current_thread() is threading.main_thread():
            return []
        cpus = one_cpu_per_core(os.sched_getaffinity(0))
    else:
        cpus = list(setting)
    # Said where the user named the CPUs; an automatic binding that cannot happen is routine.
    level = logging.DEBUG if setting == "auto" else logging.WARNING
    team = torch.get_num_threads()
    if team < 2 and setting == "auto":
        return []
    if team > len(cpus):
        logger.log(level, "not binding %d OpenMP threads to %d CPUs %s", team, len(cpus), cpus)
        return []
    # libgomp starts this thread's workers at its first parallel region: they are the
    # threads that appear across one.
    before = _thread_ids()
    torch.ones(_PARALLEL_NUMEL).add_(1)
    workers = sorted(_thread_ids() - before)
    if len(workers) != team - 1:
        logger.log(
            level,
            "not binding: %d new threads around the first parallel region, %d expected "
            "(this thread ran one before, or another thread started meanwhile)",
            len(workers),
            team - 1,
        )
        return []
    members = [threading.get_native_id(), *workers]
    for tid, cpu in zip(members, cpus, strict=False):
        os.sched_setaffinity(tid, {cpu})
    logger.debug("step thread %d and OpenMP workers %s bound to CPUs %s", members[0], workers, cpus)
    return cpus[: len(members)]
