"""What the engine sets up once: the garbage collector's tuning, and its seams' classes."""

from __future__ import annotations

import atexit
import gc
from typing import TypeVar

from tessellm.interfaces.engine import Executor, KVCacheManager, Scheduler, check_implementation
from tessellm.plugins import PluginSet

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
