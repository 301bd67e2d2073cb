"""Whether the CPU runner compiles (``TESSELLM_CPU_COMPILE``, a C++ compiler) and the
shapes of its libraries (a decode batch range, or one of verification steps of ``Q``
query tokens per sequence), with their names for messages."""

from __future__ import annotations

import os
import shutil

# "0": never compile (tests; the eager reference). "wait": build missing libraries before
# serving (benchmarks that must measure the compiled step). Otherwise: in the background.
ENABLE_ENV = "TESSELLM_CPU_COMPILE"


def compile_mode() -> str:
    """``off``, ``wait`` or ``background``, from ``TESSELLM_CPU_COMPILE``."""
    raw = os.environ.get(ENABLE_ENV, "1").strip().lower()
    if raw in ("0", "off", "false", "no"):
        return "off"
    return "wait" if raw == "wait" else "background"


def compile_enabled() -> bool:
    return compile_mode() != "off"


def compiler_missing() -> str | None:
    """Why AOTInductor cannot build here (it needs a C++ compiler), or None."""
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++) on PATH"


# A library's shape: (fewest, most) sequences for a decode library, (fewest, most, Q) for
# a verification library of Q tokens per sequence.
Shape = tuple[int, ...]


def library_shape(batch_range: tuple[int, ...], query_len: int = 1) -> Shape:
    return tuple(batch_range[:2]) if query_len == 1 else (*batch_range[:2], query_len)


def query_len_of(shape: Shape) -> int:
    return shape[2] if len(shape) > 2 else 1


def range_label(shape: Shape) -> str:
    return f"{shape[0]}-{shape[1]}"


def describe_shape(shape: Shape) -> str:
    """The library's kind and batch range, for messages."""
    if query_len_of(shape) == 1:
        return f"decode step for {range_label(shape)} sequences"
    tokens = query_len_of(shape)
    return f"verification step ({tokens} tokens a sequence) for {range_label(shape)} sequences"


def describe_pending(pending: list[Shape], verify_query_len: int) -> str:
    """``the CPU decode steps for 1-16 and 17-64 sequences`` (and the verification
    steps'), for messages."""
    decode = [range_label(shape) for shape in pending if query_len_of(shape) == 1]
    verify = [range_label(shape) for shape in pending if query_len_of(shape) > 1]
    parts = []
    if decode:
        parts.append(
            f"decode step{'s' if len(decode) > 1 else ''} for {' and '.join(decode)} sequences"
        )
    if verify:
        parts.append(
            f"verification step{'s' if len(verify) > 1 else ''} ({verify_query_len} "
            f"tokens a sequence) for {' and '.join(verify)} sequences"
        )
    return "the CPU " + " and ".join(parts)
