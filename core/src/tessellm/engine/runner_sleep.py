"""Engine sleep (vLLM's ``sleep``/``wake_up``): give the device's memory back while idle.

Level 1 frees the KV cache and moves the weights to host memory; waking copies them back.
Level 2 frees both; waking rebuilds the model from its checkpoint. Either way the KV
cache comes back empty, the same size, and the graphs or compiled steps that held the old
buffers are rebuilt (CUDA graphs are captured again; the CPU's compiled libraries, which
take buffers as inputs, are loaded again from their cache). On a CPU level 1 only frees the
KV cache: host memory is where the weights already are.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tessellm.engine.model_runner import ModelRunner

SLEEP_LEVELS = (1, 2)


def _release_graphs(runner: ModelRunner) -> None:
    close = getattr(runner.graph_runner, "close", None)
    if callable(close):
        close()
    runner.graph_runner = None
    runner.step_runner = None


def _free_device_memory(runner: ModelRunner) -> None:
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()


def sleep_runner(runner: ModelRunner, level: int) -> None:
    if level not in SLEEP_LEVELS:
        raise ValueError(f"sleep level must be 1 or 2, got {level!r}")
    if runner.sleep_level:
        return
    _release_graphs(runner)
    empty = torch.empty(0, device=runner.device)
    for layer in runner.attn_layers:
        layer.bind_kv_cache(empty, empty)
    for stateful in runner.stateful_layers:  # recurrent states go with the KV cache
        stateful.bind_state([empty for _ in stateful.state_spec.shapes])
    runner.host_weights = {}
    if level == 1 and runner.device.type != "cpu":
        for name, tensor in [*runner.model.named_parameters(), *runner.model.named_buffers()]:
            runner.host_weights[name] = tensor.data.to("cpu")
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=runner.device)
    elif level == 2:
        runner.model = None  # type: ignore[assignment]
        runner.attn_layers = []
        runner.stateful_layers = []
        runner.lora = None
    runner.sleep_level = level
    _free_device_memory(runner)


def wake_runner(runner: ModelRunner) -> float:
    """Wake ``runner``; returns the seconds it took."""
    start = time.monotonic()
    if not runner.sleep_level:
        return 0.0
    if runner.sleep_level == 2:
        runner.load_model()
    elif runner.host_weights:
        named = dict([*runner.model.named_parameters(), *runner.model.named_buffers()])
        for name, host in runner.host_weights.items():
            named[name].data = host.to(runner.device)
        runner.host_weights = {}
    runner.sleep_level = 0
    runner.initialize_cache(runner.num_blocks)
    return time.monotonic() - start
