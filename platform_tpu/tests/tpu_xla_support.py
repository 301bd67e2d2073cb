"""Shared by the XLA tests: skipped where torch-xla is not installed (the main venv; they
run in .ci/tpu.sh's venv), on XLA's CPU device where there is no TPU."""

from __future__ import annotations

import os

import pytest

# One engine shape for every XLA test, so that programs compiled by one test are
# cached for the next (torch-xla keeps them per process): contexts of up to 256 tokens
# (context buckets of 128 and 256), steps of up to 32 tokens (buckets of 16 and 32), a
# KV pool of 256 blocks (the preemption test sets its own).
XLA_ENGINE = dict(
    device="tpu",
    max_model_len=256,
    max_num_seqs=8,
    max_num_batched_tokens=32,
    num_gpu_blocks_override=256,
)


def require_xla() -> None:
    """Skip unless torch-xla imports; then run on XLA's CPU device unless a TPU is here."""
    pytest.importorskip(
        "torch_xla",
        reason="torch-xla is not installed here (the XLA tests run in .ci/tpu.sh's venv)",
    )
    from tessellm_tpu.platform import probe_tpu, tpu_device_nodes

    if not tpu_device_nodes():
        os.environ.setdefault("PJRT_DEVICE", "CPU")
    probe_tpu.cache_clear()


def compilations() -> int:
    """Programs torch-xla has compiled in this process (cache misses)."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("UncachedCompile") or 0)
