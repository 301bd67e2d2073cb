"""The thread that runs steps and its OpenMP workers get a core each
(tessellm_cpu.thread_binding); the setting's spellings; the runner asks once per thread
and thread count."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from tessellm.errors import ConfigError
from tessellm_cpu import thread_binding
from tessellm_cpu.platform import CpuPlatform, physical_cores
from tessellm_cpu.thread_binding import (
    BIND_ENV,
    bind_step_thread,
    one_cpu_per_core,
    parse_cpu_list,
    read_setting,
)


def bind_as_set() -> list[int]:
    return bind_step_thread(read_setting())


ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="binding a team needs 2 CPUs")


def in_new_thread(fn, threads: int):
    """``fn()`` on a fresh thread (a fresh OpenMP team) running ``threads`` intra-op
    threads; its result and the affinity of every thread the process gained meanwhile."""
    result: dict = {}
    before = {int(t) for t in os.listdir("/proc/self/task")}
    previous = torch.get_num_threads()

    def body() -> None:
        torch.set_num_threads(threads)
        try:
            result["value"] = fn()
            result["own"] = os.sched_getaffinity(threading.get_native_id())
            gained = {int(t) for t in os.listdir("/proc/self/task")} - before
            gained.discard(threading.get_native_id())
            result["workers"] = {tid: os.sched_getaffinity(tid) for tid in gained}
        except BaseException as error:
            result["error"] = error
        finally:  # libgomp's default for threads started later is process-wide
            torch.set_num_threads(previous)

    worker = threading.Thread(target=body)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-3,8") == [0, 1, 2, 3, 8]
    assert parse_cpu_list("2, 0,2") == [2, 0]
    for bad in ("", "3-1", "-1", "a"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


def test_one_cpu_per_core_keeps_allowed_cpus() -> None:
    chosen = one_cpu_per_core(set(ALLOWED))
    assert chosen and set(chosen) <= set(ALLOWED)
    assert chosen == sorted(chosen)


@needs_two_cpus
def test_a_step_thread_and_its_worker_get_a_core_each(monkeypatch) -> None:
    monkeypatch.delenv(BIND_ENV, raising=False)
    cores = one_cpu_per_core(set(ALLOWED))
    if len(cores) < 2:
        pytest.skip("one physical core")
    out = in_new_thread(bind_as_set, threads=2)
    assert out["value"] == cores[:2]
    assert out["own"] == {cores[0]}
    # Its OpenMP worker (torch may start other threads of its own meanwhile).
    assert {cores[1]} in out["workers"].values()
    # The calling (main) thread is left as it was.
    assert sorted(os.sched_getaffinity(0)) == ALLOWED


def test_auto_leaves_the_main_thread_and_single_threads_alone(monkeypatch) -> None:
    monkeypatch.setenv(BIND_ENV, "auto")
    assert bind_as_set() == []
    assert sorted(os.sched_getaffinity(0)) == ALLOWED
    out = in_new_thread(bind_as_set, threads=1)
    assert out["value"] == [] and sorted(out["own"]) == ALLOWED


@needs_two_cpus
def test_nobind_and_an_explicit_list(monkeypatch) -> None:
    monkeypatch.setenv(BIND_ENV, "nobind")
    out = in_new_thread(bind_as_set, threads=2)
    assert out["value"] == [] and sorted(out["own"]) == ALLOWED
    monkeypatch.setenv(BIND_ENV, f"{ALLOWED[1]},{ALLOWED[0]}")
    out = in_new_thread(bind_as_set, threads=2)
    assert out["value"] == [ALLOWED[1], ALLOWED[0]]
    assert out["own"] == {ALLOWED[1]}
    assert {ALLOWED[0]} in out["workers"].values()


def test_more_threads_than_cpus_binds_nothing(monkeypatch) -> None:
    monkeypatch.setenv(BIND_ENV, str(ALLOWED[0]))
    out = in_new_thread(bind_as_set, threads=2)
    assert out["value"] == [] and sorted(out["own"]) == ALLOWED


def test_a_bad_setting_stops_the_process_set_up(monkeypatch) -> None:
    monkeypatch.setenv(BIND_ENV, "cores please")
    with pytest.raises(ConfigError, match=BIND_ENV):
        read_setting()
    with pytest.raises(ConfigError, match=BIND_ENV):
        CpuPlatform().set_up_process()
    monkeypatch.setenv(BIND_ENV, f"{ALLOWED[0]},{max(ALLOWED) + 1}")
    with pytest.raises(ConfigError, match=f"may not use: \\[{max(ALLOWED) + 1}\\]"):
        read_setting()
    monkeypatch.setenv(BIND_ENV, " NoBind ")
    assert read_setting() == "nobind"


def test_the_platform_binds_once_per_thread_and_thread_count(monkeypatch) -> None:
    calls: list[tuple[int, int]] = []
    platform = CpuPlatform()
    monkeypatch.setattr(
        platform,
        "bind_step_thread",
        lambda: calls.append((threading.get_ident(), torch.get_num_threads())),
    )
    platform.enter_step_thread()
    platform.enter_step_thread()
    assert len(calls) == 1
    in_new_thread(platform.enter_step_thread, threads=1)
    in_new_thread(platform.enter_step_thread, threads=2)
    assert len(calls) == 3 and calls[1][1] == 1 and calls[2][1] == 2


def test_hyper_threads_of_one_core_count_once(monkeypatch, tmp_path) -> None:
    # CPUs 0 and 1: two hyper-threads of core 0; CPU 2: core 1; CPU 3 is not allowed.
    for cpu, core in ((0, 0), (1, 0), (2, 1), (3, 2)):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    monkeypatch.setattr(thread_binding, "CPU_SYSFS", tmp_path)
    assert one_cpu_per_core({0, 1, 2}) == [0, 2]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert physical_cores() == 1  # the thread count torch gets: one per core it may use
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert physical_cores() == 2
