"""Host KV caches and state slots come from anonymous private mappings: zero, writable,
resident only once touched (a 4 GiB CPU cache no longer costs seconds of start-up), and
copy-on-write across a fork like any other host memory."""

from __future__ import annotations

import os

import pytest
import torch

from tessellm.engine.cache_binding import zeroed

CPU = torch.device("cpu")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_zero_writable_and_of_the_asked_layout(dtype) -> None:
    a = zeroed((64, 16, 2, 32), dtype, CPU)
    b = zeroed((64, 16, 2, 32), dtype, CPU)
    assert a.shape == (64, 16, 2, 32) and a.dtype == dtype and a.is_contiguous()
    assert a.float().abs().sum() == 0
    a[5, 3] = 1.0
    assert a[5, 3].float().sum() == 2 * 32 and b.float().abs().sum() == 0  # own memory
    assert zeroed((3,), dtype, CPU).float().abs().sum() == 0  # under a page


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="Linux's /proc")
def test_pages_become_resident_only_when_touched() -> None:
    before = resident_bytes()
    cache = zeroed((1 << 29,), torch.uint8, CPU)  # 512 MiB
    assert resident_bytes() - before < 64 << 20
    cache[: 1 << 26].fill_(7)  # 64 MiB touched
    assert resident_bytes() - before >= 60 << 20
    assert int(cache[(1 << 26) - 1]) == 7 and int(cache[1 << 26]) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_its_own_copy() -> None:
    cache = zeroed((1024, 64), torch.float32, CPU)
    pid = os.fork()
    if pid == 0:  # the child
        cache.fill_(3.0)
        os._exit(0 if float(cache.sum()) == 3.0 * 1024 * 64 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert float(cache.abs().sum()) == 0.0
