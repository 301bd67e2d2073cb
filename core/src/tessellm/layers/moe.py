"""A fused sparse mixture-of-experts MLP that every MoE family can use.

Experts are stored stacked, as transformers 5 stores them: ``gate_up_proj``
``[E, 2*I, H]`` (gate rows first, then up) and ``down_proj`` ``[E, H, I]``. Under tensor
parallelism each rank keeps a slice of every expert's intermediate dim ``I`` (as the
column/row-parallel linears split an MLP), so the block's output is a partial sum that is
all-reduced once. With ``enable_expert_parallel`` each rank instead holds ``E / world_size``
whole experts, and tokens travel to the ranks of their experts (:func:`expert_parallel_moe`).

Tokens are grouped by expert with one sort, one ``index_select`` and one accumulating
``index_put_`` (an index-add); only the loop over experts remains, each expert
multiplying its rows in one matmul.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.model import ModelContext, ParallelInfo
from tessellm.layers.activation import GatedActivation
from tessellm.layers.parallel import all_gather_rows, all_reduce, all_to_all_rows, divide
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


def num_experts_of(config: Any) -> int:
    """The routed experts per MoE layer (Mixtral's ``num_local_experts``, Qwen's
    ``num_experts``); 0 for a dense model."""
    getter = getattr(config, "get_text_config", None)
    cfg = getter() if getter else config
    return int(getattr(cfg, "num_local_experts", 0) or getattr(cfg, "num_experts", 0) or 0)


def experts_per_rank(num_experts: int, world_size: int) -> int:
    """``num_experts / world_size``; a ``ConfigError`` saying what to change when uneven
    (an uneven split would leave some ranks with more experts, hence more work per step,
    and every rank waits for the slowest in the combine)."""
    if num_experts % world_size:
        from tessellm.errors import ConfigError

        raise ConfigError(
            f"enable_expert_parallel: the model's {num_experts} experts do not divide evenly "
            f"over tensor_parallel_size={world_size} ranks; choose a size that divides "
            f"{num_experts}, or leave expert parallelism off (every rank then holds a slice "
            "of every expert)"
        )
    return num_experts // world_size


def check_expert_parallel_fit(config: Any, world_size: int) -> None:
    """Raise ``ConfigError`` before any worker starts unless the experts split evenly.
    A dense model has nothing to distribute: the flag changes nothing for it (as in vLLM)."""
    experts = num_experts_of(config)
    if experts:
        experts_per_rank(experts, world_size)


class GroupedRows(NamedTuple):
    """(token, expert) pairs sorted by expert: the token and routing weight of each row,
    and the rows of each local expert plus, last, those of other ranks' experts."""

    token_of_row: torch.Tensor
    weight_of_row: torch.Tensor
    rows_per_expert: torch.Tensor


class FusedExperts(nn.Module):
    """``E`` gated MLPs as stacked tensors; returns this rank's partial sum (not reduced).

    Under expert parallelism the stacks hold only this rank's ``num_local_experts`` whole
    experts (global ids ``first_expert ...``); ``forward`` still takes global expert ids
    and leaves out the pairs routed elsewhere.
    """

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
        parallel = ctx.parallel
        self.num_experts = num_experts
        if parallel.expert_parallel and parallel.world_size > 1:
            self.num_local_experts = experts_per_rank(num_experts, parallel.world_size)
            self.first_expert = parallel.rank * self.num_local_experts
            self.local_intermediate, self.intermediate_start = intermediate_size, 0
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.local_intermediate = divide(intermediate_size, parallel.world_size)
            self.intermediate_start = parallel.rank * self.local_intermediate
        size, local = self.local_intermediate, self.num_local_experts
        self.gate_up_proj = nn.Parameter(
            torch.empty(local, 2 * size, hidden_size, dtype=ctx.dtype), requires_grad=False
        )
        self.down_proj = nn.Parameter(
            torch.empty(local, hidden_size, size, dtype=ctx.dtype), requires_grad=False
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
        weight) or, with ``expert=None``, the whole stack under transformers 5 names. Under
        expert parallelism, other ranks' experts are skipped (never copied)."""
        first, local = self.first_expert, self.num_local_experts
        if expert is None:
            dst, loaded = param.data, loaded.narrow(0, first, local)
        elif not first <= expert < first + local:
            return
        else:
            dst = param.data[expert - first]
        size, start = self.local_intermediate, self.intermediate_start
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

    def group(self, weights: torch.Tensor, expert_ids: torch.Tensor) -> GroupedRows:
        """Sort the ``[T, top_k]`` (token, expert) pairs by this rank's experts, on the
        device (no host sync). Pairs routed to other ranks' experts sort last, into one
        extra bucket that :meth:`apply` leaves out."""
        top_k, local = expert_ids.shape[1], self.num_local_experts
        flat_ids = expert_ids.reshape(-1) - self.first_expert
        if local < self.num_experts:
            flat_ids = torch.where((flat_ids >= 0) & (flat_ids < local), flat_ids, local)
        # Stable, so each token's contributions are summed in ascending expert order, the
        # order transformers adds them in: fp32 results then agree bit for bit.
        order = torch.argsort(flat_ids, stable=True)
        return GroupedRows(
            order // top_k,
            weights.reshape(-1).index_select(0, order),
            torch.bincount(flat_ids, minlength=local + 1),
        )

    def apply(
        self, hidden: torch.Tensor, grouped: GroupedRows, rows_per_expert: list[int]
    ) -> torch.Tensor:
        """Run the experts over ``grouped`` rows; ``rows_per_expert`` is
        ``grouped.rows_per_expert`` read on the host."""
        rows_per_expert = rows_per_expert[: self.num_local_experts]
        routed = sum(rows_per_expert)
        token_of_row = grouped.token_of_row[:routed]
        rows_in = hidden.index_select(0, token_of_row)
        expert_out = torch.empty_like(rows_in)
        start = 0
        for expert, count in enumerate(rows_per_expert):
            if count == 0:
                continue
            rows = rows_in[start : start + count]
            inner = self.act(F.linear(rows, self.gate_up_proj[expert]))
            expert_out[start : start + count] = F.linear(inner, self.down_proj[expert])
            start += count
        expert_out *= grouped.weight_of_row[:routed].unsqueeze(-1)
        # index_put_ with accumulate is index_add_ that runs serially on CPU, adding rows in
        # their (expert-sorted) order; index_add_ opens a thread-parallel region even for a
        # few rows, which costs ~100 ms per call on a CPU whose cores are busy.
        out = torch.zeros_like(hidden)
        return out.index_put_((token_of_row,), expert_out, accumulate=True)

    def forward(
        self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """``hidden`` ``[T, H]``; ``weights``/``expert_ids`` ``[T, top_k]`` (global ids) →
        ``[T, H]``, zero rows for tokens with none of this rank's experts."""
        grouped = self.group(weights, expert_ids)
        return self.apply(hidden, grouped, grouped.rows_per_expert.tolist())


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
        if self.experts.num_local_experts < self.experts.num_experts:
            return expert_parallel_moe(hidden, weights, expert_ids, self.experts, self.parallel)
        return all_reduce(self.experts(hidden, weights, expert_ids), self.parallel)


def expert_parallel_moe(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    experts: FusedExperts,
    parallel: ParallelInfo,
) -> torch.Tensor:
    """The MoE output ``[T, H]`` with whole experts spread over the ranks.

    Attention stays tensor-parallel, so every rank enters with all ``T`` tokens and the
    same routing (the same hidden states through the same replicated router). Rank ``r``
    owns the token slice ``[r*c, (r+1)*c)``, ``c = ceil(T / ranks)``.

    - Dispatch: a token needs rank ``d`` when one of its top-k experts lives there. Rank
      ``d`` already holds that token, so dispatching it is a selection on ``d``, not a
      transfer: ``d`` runs its experts over every token routed to them.
    - Combine: ``d`` sends each such token's partial sum (its experts' weighted outputs,
      one row per token however many of its experts ``d`` holds) to the token's owner, in
      one ``all_to_all_rows``; owners add the partial sums in rank order.
    - The owners' slices are all-gathered, so every rank leaves with all ``T`` rows, as the
      next (tensor-parallel) attention needs them.

    Every rank derives the send and receive counts of all ranks from the shared routing,
    so no counts are exchanged. Per rank this moves at most what the tensor-parallel
    all-reduce moves, less when tokens do not reach every rank (docs/distributed.md).
    """
    ranks, rank = parallel.world_size, parallel.rank
    tokens = hidden.shape[0]
    chunk = -(-tokens // ranks)
    bounds = [min(s * chunk, tokens) for s in range(ranks + 1)]
    owner = torch.div(expert_ids, experts.num_local_experts, rounding_mode="floor")
    needs = torch.zeros(ranks * chunk, ranks, dtype=torch.bool, device=hidden.device)
    needs[:tokens].scatter_(1, owner, True)  # needs[t, d]: token t has an expert on rank d
    # counts[s, d]: tokens of slice s with an expert on rank d. Read on the host together
    # with the experts' row counts: one host sync per layer, as without expert parallelism.
    counts = needs.view(ranks, chunk, ranks).sum(1)
    grouped = experts.group(weights, expert_ids)
    host = torch.cat([counts.flatten(), grouped.rows_per_expert]).tolist()
    counts_of = [host[s * ranks : (s + 1) * ranks] for s in range(ranks)]
    partial = experts.apply(hidden, grouped, host[ranks * ranks :])
    send = [counts_of[s][rank] for s in range(ranks)]
    # The tokens this rank sends, ascending (so grouped by owner slice): a stable sort puts
    # the needed ones first, where nonzero() would cost a host sync.
    sent = first_true(needs[:tokens, rank], sum(send))
    received = all_to_all_rows(partial.index_select(0, sent), send, counts_of[rank], parallel)
    lo, hi = bounds[rank], bounds[rank + 1]
    # Received rows come rank by rank, each rank's in token order.
    position = first_true(needs[lo:hi].T.reshape(-1), sum(counts_of[rank]))
    own = hidden.new_zeros(hi - lo, hidden.shape[1])
    own.index_put_((position % max(hi - lo, 1),), received, accumulate=True)
    sizes = [bounds[s + 1] - bounds[s] for s in range(ranks)]
    return all_gather_rows(own, sizes, parallel)


def first_true(mask: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the ``count`` true entries of a 1-D ``mask``, ascending, where
    ``count`` is known on the host already (``nonzero`` would synchronise to learn it)."""
    return torch.argsort((~mask).to(torch.uint8), stable=True)[:count]


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
