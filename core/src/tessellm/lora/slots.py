"""Batched multi-LoRA: adapters in a fixed number of slots, each token adapted by its own.

Every adapted linear layer holds, per slot, its adapters' ``A`` matrices stacked (one
``max_lora_rank``-row block per piece of a fused layer: q, k, v or gate, up) and their
``B`` matrices (scaled) placed at each piece's output columns, zero elsewhere. A step's
tokens are grouped by slot; each group adds ``(x A^T) B^T`` to the layer's output: two
small matmuls per adapter in the batch, over that adapter's tokens only (the shrink and
expand of Punica/S-LoRA, in torch). Tokens of requests without an adapter get nothing.

Where the platform's fused-ops table has ``lora_shrink`` and ``lora_expand`` (Triton
kernels on CUDA), a step's tokens are instead sorted by slot once (``LoRATokens``) and
each layer makes one shrink launch and one expand launch per piece, whatever the number
of adapters in the step; the torch path stays the CPU's and the reference.

Tensor parallelism: a column-parallel layer keeps its rank's rows of ``B``; a
row-parallel one its rank's columns of ``A``, so ``x A^T`` is a partial sum, all-reduced
(``r`` numbers per token) before the expand.

Adapters are read from disk into host memory once (LRU, ``max_cpu_loras``) and copied into
a slot when a step needs them; the least recently used adapter not in the step gives up
its slot. The scheduler keeps at most ``max_loras`` adapters in a step.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from tessellm.engine.transfer import to_device
from tessellm.errors import InvalidRequestError
from tessellm.interfaces.model import ParallelInfo
from tessellm.interfaces.ops import FusedOps, LoRATokens
from tessellm.interfaces.schedule import SchedulerOutput
from tessellm.layers.parallel import all_reduce
from tessellm.lora.adapter import AdapterWeights, load_adapter_weights
from tessellm.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepLoRA:
    """This step's token groups: ``(slot, token indices)``, indices ``None`` when the group
    is every token of the step (the torch path); or, with kernels, ``tokens``, every
    token's slot; ``slots``: the slots in the step. Neither: no adapter in the step."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    tokens: LoRATokens | None = None
    slots: set[int] = field(default_factory=set)
    kernels: FusedOps | None = None  # lora_shrink and lora_expand, or None: torch
    # While a graph is captured: every layer runs its kernels, whichever adapters its
    # slots hold then (a replay may find others there).
    every_layer: bool = False

    @property
    def active(self) -> bool:
        return bool(self.groups) or self.tokens is not None


def token_layout(slots: torch.Tensor, num_slots: int, device: torch.device) -> LoRATokens:
    """``LoRATokens`` for per-token ``slots`` (a CPU int tensor, -1 for no adapter): sorted
    here on the host and copied to ``device`` in one transfer, queued without waiting for
    the device (the overlapped loop's previous step may still run)."""
    slots = slots.to(torch.int32)
    key = torch.where(slots < 0, num_slots, slots)  # the tokens without an adapter last
    order = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.bincount(key, minlength=num_slots + 1)[:num_slots]
    starts = torch.zeros(num_slots + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(counts, 0)
    packed = to_device(torch.cat([slots, order, starts]), device)
    n = slots.shape[0]
    return LoRATokens(
        slots=packed[:n],
        order=packed[n : 2 * n],
        starts=packed[2 * n :],
        max_tokens_per_slot=max(1, int(counts.max())) if num_slots else 1,
    )


class LayerLoRA:
    """One linear layer's adapter slots (``layer.lora``)."""

    def __init__(
        self, layer: nn.Module, step: StepLoRA, num_slots: int, max_rank: int, row_parallel: bool
    ) -> None:
        self.step = step
        self.max_rank = max_rank
        self.row_parallel = row_parallel
        self.parallel: ParallelInfo = layer.parallel
        self.shard_sizes: list[int] = list(layer.output_shard_sizes)
        self.kv_replicas = getattr(layer, "kv_replicas", 1)
        width = len(self.shard_sizes) * max_rank
        dtype, device = layer.ctx.dtype, layer.ctx.device
        # On a CPU in fp32: the matrices are small, and half-precision matmuls there build a
        # kernel per new shape (every group size of every step): seconds per step.
        self.compute_dtype = torch.float32 if device.type == "cpu" else dtype
        cd = self.compute_dtype
        self.a = torch.zeros(num_slots, width, layer.in_features, dtype=cd, device=device)
        self.b = torch.zeros(num_slots, layer.out_features, width, dtype=cd, device=device)
        # Per slot, whether its adapter adapts this layer: a step whose adapters all leave
        # it alone skips its kernels.
        self.adapted = [False] * num_slots

    def load(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an adapter's matrices for this layer (full size) into ``slot``: this rank's
        slice of each."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.adapted[slot] = bool(shards)
        rank, r_max = self.parallel.rank, self.max_rank
        for piece, (a, b) in shards.items():
            r = a.shape[0]
            cols = slice(piece * r_max, piece * r_max + r)
            if self.row_parallel:
                width = self.a.shape[2]
                self.a[slot, cols] = a[:, rank * width : (rank + 1) * width].to(self.a.dtype)
                self.b[slot, :, cols] = b.to(self.b.dtype)
                continue
            size = self.shard_sizes[piece]
            offset = sum(self.shard_sizes[:piece])
            # Replicated KV heads (fewer than ranks): ranks share a k/v slice.
            source = rank // self.kv_replicas if piece > 0 and self.kv_replicas > 1 else rank
            if b.shape[0] < (source + 1) * size:
                raise InvalidRequestError(
                    f"a LoRA B matrix has {b.shape[0]} rows; this layer's piece {piece} "
                    f"needs {size} per rank"
                )
            self.a[slot, cols] = a.to(self.a.dtype)
            rows = b[source * size : (source + 1) * size]
            self.b[slot, offset : offset + size, cols] = rows.to(self.b.dtype)

    def shrink(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor | None:
        """``x A^T`` for each group (partial sums on a row-parallel layer); with kernels,
        one fp32 ``[T, width]`` for every token (None: no adapter of the step adapts this
        layer)."""
        step = self.step
        if step.tokens is not None:
            if not step.every_layer and not any(self.adapted[s] for s in step.slots):
                return None
            return step.kernels.lora_shrink(x, self.a, step.tokens, 1.0)
        cd = self.compute_dtype
        return [
            (x if index is None else x[index]).to(cd) @ self.a[slot].T
            for slot, index in self.step.groups
        ]

    def expand(
        self, shrunk: list[torch.Tensor] | torch.Tensor | None, y: torch.Tensor
    ) -> torch.Tensor:
        """``y`` plus each group's ``(x A^T) B^T`` at its tokens (with kernels: ``y``
        itself, added to in place, each piece of a fused layer at its own columns)."""
        if shrunk is None:
            return y
        if isinstance(shrunk, torch.Tensor):
            expand, tokens, r_max = self.step.kernels.lora_expand, self.step.tokens, self.max_rank
            offset = 0
            for piece, size in enumerate(self.shard_sizes):
                cols = slice(piece * r_max, (piece + 1) * r_max)
                b = self.b[:, offset : offset + size, cols]
                expand(shrunk[:, cols], b, y, tokens, offset)
                offset += size
            return y
        for (slot, index), u in zip(self.step.groups, shrunk, strict=True):
            delta = (u @ self.b[slot].T).to(y.dtype)
            y = y + delta if index is None else y.index_add(0, index, delta)
        return y

    def reduce(
        self, shrunk: list[torch.Tensor] | torch.Tensor | None
    ) -> list[torch.Tensor] | torch.Tensor | None:
        """Sum a row-parallel layer's partial ``x A^T`` over the ranks."""
        if self.parallel.world_size == 1 or shrunk is None:
            return shrunk
        if isinstance(shrunk, torch.Tensor):
            return all_reduce(shrunk, self.parallel)
        if not shrunk:
            return shrunk
        sizes = [u.shape[0] for u in shrunk]
        return list(all_reduce(torch.cat(shrunk), self.parallel).split(sizes))


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers of the decoder's blocks (attention and MLP projections)."""
    from tessellm.layers.linear import _ParallelLinear

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _ParallelLinear) and ".layers." in f".{name}"
    ]


class LoRAManager:
    """Slots on the device, adapters in host memory, and each step's token groups."""

    def __init__(
        self,
        model: nn.Module,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
        fused_ops: FusedOps | None = None,
    ) -> None:
        """``fused_ops``: the platform's table; its ``lora_shrink`` and ``lora_expand``,
        when it has both, run every layer's adapters (else the torch path)."""
        from tessellm.layers.linear import RowParallelLinear

        self.model = model
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras, max_loras)
        self.step = StepLoRA()
        if fused_ops is not None and fused_ops.lora_shrink and fused_ops.lora_expand:
            self.step.kernels = fused_ops
        self.layers: dict[str, LayerLoRA] = {}
        for name, module in adapted_layers(model):
            row = isinstance(module, RowParallelLinear)
            module.lora = self.layers[name] = LayerLoRA(
                module, self.step, max_loras, max_lora_rank, row
            )
        self._slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        self._host: OrderedDict[int, AdapterWeights] = OrderedDict()
        self._paths: dict[int, str] = {}

    def _weights(self, request: LoRARequest) -> AdapterWeights:
        weights = self._host.get(request.lora_int_id)
        if weights is not None and self._paths.get(request.lora_int_id) == request.lora_path:
            self._host.move_to_end(request.lora_int_id)
            return weights
        weights = load_adapter_weights(request.lora_path, self.model, self.max_rank)
        self._host[request.lora_int_id] = weights
        self._paths[request.lora_int_id] = request.lora_path
        while len(self._host) > self.max_cpu_loras:
            self._host.popitem(last=False)
        return weights

    def _slot(self, request: LoRARequest, in_step: set[int]) -> int:
        adapter_id = request.lora_int_id
        slot = self._slots.get(adapter_id)
        if slot is not None and self._paths.get(adapter_id) == request.lora_path:
            self._slots.move_to_end(adapter_id)
            return slot
        if slot is None:
            if len(self._slots) < self.max_loras:
                slot = len(self._slots)
            else:
                victim = next((i for i in self._slots if i not in in_step), None)
                if victim is None:
                    raise InvalidRequestError(
                        f"a step asked for more than max_loras={self.max_loras} adapters"
                    )
                slot = self._slots.pop(victim)
        weights = self._weights(request)
        for name, layer in self.layers.items():
            layer.load(slot, weights.layers.get(name, {}))
        unknown = set(weights.layers) - set(self.layers)
        if unknown:
            raise InvalidRequestError(f"LoRA layers with no adapted layer here: {sorted(unknown)}")
        self._slots[adapter_id] = slot
        self._slots.move_to_end(adapter_id)
        return slot

    def forget(self, adapter_id: int) -> None:
        """Drop an adapter (unloaded): its slot and host copy are freed for others."""
        self._host.pop(adapter_id, None)
        self._paths.pop(adapter_id, None)
        slot = self._slots.pop(adapter_id, None)
        if slot is not None:  # the freed slot takes the next adapter: renumber compactly
            moved = [(i, s) for i, s in self._slots.items() if s > slot]
            for i, s in moved:
                self._slots[i] = s - 1
                for layer in self.layers.values():
                    layer.a[s - 1].copy_(layer.a[s])
                    layer.b[s - 1].copy_(layer.b[s])
                    layer.adapted[s - 1] = layer.adapted[s]

    def prepare(self, plan: SchedulerOutput, device: torch.device) -> bool:
        """Group this step's tokens by adapter slot (loading adapters as needed); True
        when any token has an adapter."""
        self.clear()
        wanted = [seq.lora_request for seq in plan.seqs]
        if not any(wanted):
            return False
        in_step = {r.lora_int_id for r in wanted if r is not None}
        if self.step.kernels is not None:
            seq_slots = [-1 if r is None else self._slot(r, in_step) for r in wanted]
            lengths = torch.tensor([len(seq.token_ids) for seq in plan.seqs])
            slots = torch.tensor(seq_slots).repeat_interleave(lengths)
            self.step.tokens = token_layout(slots, self.max_loras, device)
            self.step.slots = {s for s in seq_slots if s >= 0}
            return True
        ranges: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for seq, request in zip(plan.seqs, wanted, strict=True):
            end = start + len(seq.token_ids)
            if request is not None:
                ranges.setdefault(self._slot(request, in_step), []).append((start, end))
            start = end
        for slot, spans in ranges.items():
            if len(ranges) == 1 and spans == [(0, start)]:
                self.step.groups.append((slot, None))
                continue
            index = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
            self.step.groups.append((slot, index))
        return True

    def clear(self) -> None:
        self.step.groups.clear()
        self.step.tokens = None
        self.step.slots = set()
