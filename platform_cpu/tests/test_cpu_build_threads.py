"""While a background build holds a core, the engine's steps run one thread fewer, and
get every thread back when the build ends (CompiledDecodeRunner.yield_core); the compile
setting's spellings."""

from __future__ import annotations

import pytest
import torch

from tessellm_cpu.compile_plan import compile_mode
from tessellm_cpu.compiled_decode import CompiledDecodeRunner


class FakeBuild:
    def __init__(self) -> None:
        self.alive = True

    def running(self) -> bool:
        return self.alive


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def runner_with(build: FakeBuild | None, pending: list) -> CompiledDecodeRunner:
    runner = CompiledDecodeRunner.__new__(CompiledDecodeRunner)  # only yield_core's state
    runner.threads = 3
    runner._build, runner.pending = build, pending
    return runner


def test_steps_yield_a_core_while_the_build_runs(threads) -> None:
    build = FakeBuild()
    runner = runner_with(build, [(1, 16)])
    runner.yield_core()
    assert torch.get_num_threads() == 2
    runner.yield_core()  # idempotent
    assert torch.get_num_threads() == 2
    build.alive = False  # the build ended (pending cleared or not): every thread back
    runner.yield_core()
    assert torch.get_num_threads() == 3


def test_a_finished_build_with_nothing_pending_keeps_every_thread(threads) -> None:
    runner = runner_with(FakeBuild(), [])  # the process lingers after its last library
    runner.yield_core()
    assert torch.get_num_threads() == 3


def test_one_core_never_goes_below_one_thread(threads) -> None:
    torch.set_num_threads(1)
    runner = runner_with(FakeBuild(), [(1, 16)])
    runner.threads = 1
    runner.yield_core()
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(
    ("raw", "mode"),
    [("0", "off"), ("off", "off"), ("False", "off"), ("no", "off"), ("wait", "wait"),
     ("1", "background"), ("", "background")],
)  # fmt: skip
def test_compile_setting_spellings(monkeypatch, raw: str, mode: str) -> None:
    monkeypatch.setenv("TESSELLM_CPU_COMPILE", raw)
    assert compile_mode() == mode
