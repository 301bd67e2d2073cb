"""What the engine sets up once: the garbage collector's tuning, its seams' classes, the
KV capacity's bound on ``max_model_len`` and the scheduler's configuration."""

from __future__ import annotations

import atexit
import gc
import logging
from typing import TypeVar

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError
from tessellm.interfaces.engine import (
    Executor,
    KVCacheManager,
    Scheduler,
    SchedulerConfig,
    check_implementation,
)
from tessellm.plugins import PluginSet

logger = logging.getLogger(__name__)

# A step allocates thousands of short-lived containers (plans, outputs), all freed by
# reference counting; at Python's default of 700 the young generation was collected
# ~3 times a step, for nothing. Raised to this, never lowered.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Tune the process's garbage collector for the step loop. What startup built
    (modules, tokenizer, registries, imported code) lives as long as the engine: it is
    left out of collections, since a full one walking it all takes ~100 ms, which would
    land in some step every few hundred steps."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    # Unfrozen at exit, so finalization still frees what is left (extension modules
    # would otherwise report their objects as leaked).
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)


Seam = TypeVar("Seam", Executor, Scheduler, KVCacheManager)


def load_seam(plugins: PluginSet, kind: str, name: str, base: type[Seam]) -> type[Seam]:
    """The class registered as ``name`` under ``kind``, checked against its seam's ABC
    once, here, so the engine may then call the declared members without probing."""
    cls = plugins.load(kind, name)
    registration = plugins.get(kind, name)
    label = kind.removesuffix("s").replace("_", " ")
    origin = f" (from plugin {registration.plugin!r})" if registration is not None else ""
    check_implementation(cls, base, f"{label} {name!r}{origin}")
    return cls


def fit_max_model_len(num_blocks: int, block_size: int, max_model_len: int) -> int:
    """``max_model_len``, lowered (with a warning) to what ``num_blocks`` can hold; a
    ``ConfigError`` when not even two blocks fit."""
    if num_blocks < 2:
        raise ConfigError(
            "not enough memory for the KV cache; lower max_model_len or raise "
            "gpu_memory_utilization / kv_cache_memory_bytes"
        )
    capacity = num_blocks * block_size
    if capacity < max_model_len:
        logger.warning(
            "max_model_len %d exceeds KV capacity %d; lowering it", max_model_len, capacity
        )
        return capacity
    return max_model_len


def scheduler_config(
    args: EngineArgs, max_model_len: int, executor: Executor, plugins: PluginSet
) -> SchedulerConfig:
    """The scheduler's limits from the engine arguments (a prompt must fit one step
    without chunked prefill; speculation reserves its drafts' slots; mixed batches as
    the platform prefers unless the arguments say)."""
    batched = args.max_num_batched_tokens or max(8192, args.max_num_seqs)
    if not args.enable_chunked_prefill:
        batched = max(batched, max_model_len)
    spec = args.speculative_config
    return SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=batched,
        max_model_len=max_model_len,
        enable_chunked_prefill=args.enable_chunked_prefill,
        mixed_batches=mixed_batches(args, plugins),
        policy=args.scheduling_policy,
        num_lookahead_slots=spec.num_speculative_tokens if spec else 0,
        max_loras=args.max_loras if args.enable_lora else 0,
        max_concurrent_batches=int(executor.max_concurrent_batches),
    )


def mixed_batches(args: EngineArgs, plugins: PluginSet) -> bool:
    """``enable_mixed_batches``, or the platform's preference when it is unset."""
    if args.enable_mixed_batches is not None:
        return args.enable_mixed_batches
    from tessellm.selection import choose_platform

    platform, _ = choose_platform(plugins, args.device)
    return bool(platform.mixed_batches)
