"""transformers parses a GGUF file's whole metadata for the config and again for the
tokenizer's config (``load_gguf_checkpoint``: every field, a 49k-token vocabulary and its
merges included, ~5 s for SmolLM2-135M on a 2-core AVX2 CPU); on a cold start that was a
quarter of the time to a healthy server. ``read_once`` lends both conversions one parse:
while it is active, transformers' ``load_gguf_checkpoint(path, return_tensors=False)``
answers a path it has read from a kept copy (a deep copy each time: callers edit what
they get). The copy lives until ``forget`` (after the tokenizer, the second conversion).
Where transformers lacks the function the conversions parse as before.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_lock = threading.Lock()  # the patch is process-wide: one conversion at a time
_kept: dict[tuple, dict[str, Any]] = {}


def _key(path: Any) -> tuple:
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


@contextmanager
def read_once() -> Iterator[None]:
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "load_gguf_checkpoint", None)
    if original is None:
        yield
        return

    def load_once(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return original(path, return_tensors, *args, **kwargs)
        key = _key(path)
        if key not in _kept:
            _kept.clear()  # one file at a time
            _kept[key] = original(path, return_tensors=False)
        return copy.deepcopy(_kept[key])

    with _lock:
        gguf_utils.load_gguf_checkpoint = load_once
        try:
            yield
        finally:
            gguf_utils.load_gguf_checkpoint = original


def forget() -> None:
    _kept.clear()
