"""Static LoRA inputs for captured decode graphs (CUDA graphs).

The LoRA kernels read a step's layout (:class:`~tessellm.interfaces.ops.LoRATokens`) from
device tensors and size their grids by the batch, never by the adapters in it, so one
graph per batch size serves every mix of adapters: the graph is captured over static
buffers (every token of no adapter, grids for the worst case of one slot holding every
token) and, before a replay, the step's layout is copied into them, the padding rows
marked as having no adapter. The adapters' matrices are read from the slots, which keep
their addresses while adapters come and go.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tessellm.interfaces.ops import LoRATokens
from tessellm.lora.slots import StepLoRA


class LoRAGraphInputs:
    """The static layout buffers a graph runner captures its LoRA graphs over."""

    def __init__(self, step: StepLoRA, num_slots: int, max_tokens: int, device: torch.device):
        self.step = step
        with torch.device(device):
            self.slots = torch.full((max_tokens,), -1, dtype=torch.int32)
            self.order = torch.zeros(max_tokens, dtype=torch.int32)
            self.starts = torch.zeros(num_slots + 1, dtype=torch.int32)

    @classmethod
    def of(cls, model: nn.Module, max_tokens: int, device: torch.device) -> LoRAGraphInputs | None:
        """Buffers for ``model``'s adapters, or None: no adapters, or the torch path (its
        per-adapter index tensors change shape with the mix: never captured)."""
        layer = next((m.lora for m in model.modules() if getattr(m, "lora", None)), None)
        if layer is None or layer.step.kernels is None:
            return None
        return cls(layer.step, layer.a.shape[0], max_tokens, device)

    @property
    def wanted(self) -> bool:
        """Whether this step has adapters (the LoRA graph, not the plain one, serves it)."""
        return self.step.tokens is not None

    @contextmanager
    def capturing(self, size: int) -> Iterator[None]:
        """The model's LoRA layers run their kernels over the static buffers for ``size``
        tokens (none of them adapted: warm-up runs change nothing)."""
        self.slots.fill_(-1)
        self.starts.zero_()
        step = self.step
        step.tokens = LoRATokens(self.slots[:size], self.order[:size], self.starts, size)
        step.every_layer = True
        try:
            yield
        finally:
            step.tokens = None
            step.every_layer = False

    def copy_in(self, num_tokens: int, size: int) -> None:
        """This step's layout (``num_tokens`` tokens) into the buffers of a ``size`` graph."""
        tokens = self.step.tokens
        self.slots[:num_tokens].copy_(tokens.slots, non_blocking=True)
        if size > num_tokens:
            self.slots[num_tokens:size].fill_(-1)
        self.order[:num_tokens].copy_(tokens.order, non_blocking=True)
        self.starts.copy_(tokens.starts, non_blocking=True)
