"""A fused sparse mixture-of-experts MLP that every MoE family can use.

Experts are stored stacked, as transformers 5 stores them: ``gate_up_proj``
``[E, 2*I, H]`` (gate rows first, then up) and ``down_proj`` ``[E, H, I]``. Under tensor
parallelism each rank keeps a slice of every expert's intermediate dim ``I`` (as the
column/row-parallel linears split an MLP), so the block's output is a partial sum that is
all-reduced once.

Tokens are grouped by expert with one sort, one ``index_select`` and one accumulating
``index_put_`` (an index-add); only the loop over experts remains, each expert
multiplying its rows in one matmul.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.model import ModelContext
from tessellm.layers.activation import GatedActivation
from tessellm.layers.parallel import all_reduce, divide
from tessellm.layers.weight_loading import WeightRule, weight_rule


def route_top_k(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (fp32), keep the ``top_k`` largest; ``renormalize`` rescales the
    kept probabilities to sum to one (Mixtral always does; Qwen MoE when
    ``norm_topk_prob``). Returns ``(weights, expert ids)``, each ``[T, top_k]``."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), expert_ids


class FusedExperts(nn.Module):
    """``E`` gated MLPs as stacked tensors; returns this rank's partial sum (not reduced)."""

    # The per-expert row counts are read on the host to slice the grouped rows, which a
    # CUDA graph cannot capture; platforms skip graphs for models holding this layer.
    graph_capturable: ClassVar[bool] = False

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        ctx: ModelContext,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.rank = ctx.parallel.rank
        self.local_intermediate = divide(intermediate_size, ctx.parallel.world_size)
        size = self.local_intermediate
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * size, hidden_size, dtype=ctx.dtype), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, size, dtype=ctx.dtype), requires_grad=False
        )
        self.act = GatedActivation(activation)

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,
        expert: int | None = None,
        piece: str | None = None,
    ) -> None:
        """Load one expert's ``piece`` (``"gate"``, ``"up"`` or ``"down"``, a 2-D HF Linear
        weight) or, with ``expert=None``, the whole stack under transformers 5 names."""
        dst = param.data if expert is None else param.data[expert]
        size, start = self.local_intermediate, self.rank * self.local_intermediate
        if param is self.down_proj:
            dst.copy_(loaded.narrow(-1, start, size))
            return
        if piece is None:  # a stacked [E, 2*I, H]: gate rows, then up rows
            gate, up = loaded.chunk(2, dim=-2)
            pieces = {"gate": gate, "up": up}
        else:
            pieces = {piece: loaded}
        for name, part in pieces.items():
            offset = 0 if name == "gate" else size
            dst.narrow(-2, offset, size).copy_(part.narrow(-2, start, size))

    def forward(
        self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """``hidden`` ``[T, H]``; ``weights``/``expert_ids`` ``[T, top_k]`` → ``[T, H]``."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)
        # Stable, so each token's contributions are summed in ascending expert order, the
        # order transformers adds them in: fp32 results then agree bit for bit.
        order = torch.argsort(flat_ids, stable=True)
        token_of_row = order // top_k
        rows_per_expert = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        grouped = hidden.index_select(0, token_of_row)
        expert_out = torch.empty_like(grouped)
        start = 0
        for expert, count in enumerate(rows_per_expert):
            if count == 0:
                continue
            rows = grouped[start : start + count]
            inner = self.act(F.linear(rows, self.gate_up_proj[expert]))
            expert_out[start : start + count] = F.linear(inner, self.down_proj[expert])
            start += count
        expert_out *= weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        # index_put_ with accumulate is index_add_ that runs serially on CPU, adding rows in
        # their (expert-sorted) order; index_add_ opens a thread-parallel region even for a
        # few rows, which costs ~100 ms per call on a CPU whose cores are busy.
        out = torch.zeros_like(hidden)
        return out.index_put_((token_of_row,), expert_out, accumulate=True)


class TopKRouter(nn.Module):
    """The gate: one logit per expert from a replicated ``[E, H]`` matrix."""

    def __init__(self, num_experts: int, hidden_size: int, ctx: ModelContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=ctx.dtype), requires_grad=False
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)


class SparseMoeBlock(nn.Module):
    """Router plus fused experts: the MLP of a MoE decoder layer (``mlp.gate``,
    ``mlp.experts`` as transformers 5 names them)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        ctx: ModelContext,
        renormalize: bool,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.renormalize = renormalize
        self.parallel = ctx.parallel
        self.gate = TopKRouter(num_experts, hidden_size, ctx)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, ctx, activation)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = route_top_k(self.gate(hidden), self.top_k, self.renormalize)
        return all_reduce(self.experts(hidden, weights, expert_ids), self.parallel)


def expert_weight_rules(gate: str, up: str, down: str) -> tuple[WeightRule, ...]:
    """Rules for per-expert checkpoint names ``….experts.<e>.<gate|up|down>.weight`` (the
    names checkpoints use, e.g. ``gate_proj``/``up_proj``/``down_proj`` or Mixtral's
    ``w1``/``w3``/``w2``) into :class:`FusedExperts`' stacked parameters. Put them before
    any rule that would also match the dense MLP's names."""
    rules = []
    for ckpt, param, piece in ((gate, "gate_up_proj", "gate"), (up, "gate_up_proj", "up")):
        rules.append(
            weight_rule(
                rf"\.experts\.(\d+)\.{ckpt}\.weight$",
                rf".experts.{param}",
                lambda m, piece=piece: (int(m.group(1)), piece),
            )
        )
    rules.append(
        weight_rule(
            rf"\.experts\.(\d+)\.{down}\.weight$",
            ".experts.down_proj",
            lambda m: (int(m.group(1)), "down"),
        )
    )
    return tuple(rules)
