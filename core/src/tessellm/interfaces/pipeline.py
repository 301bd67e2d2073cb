"""Pipeline parallelism: which decoder layers each stage holds, and where a rank sits.

Ranks are laid out tensor-parallel innermost, as vLLM lays them out: global rank
``stage * tp + tp_rank``. Stage ``s`` holds layers ``[start, end)`` of the split below;
its first stage also holds the embedding, its last the final norm and the LM head (and the
embedding too when the head is tied to it). Tensor-parallel rank ``t`` of stage ``s``
receives its hidden states from rank ``t`` of stage ``s - 1`` and sends them to rank ``t``
of stage ``s + 1``: each rank of a stage holds the whole hidden states after its
all-reduce, so no gather is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessellm.errors import ConfigError


def layer_split(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Each stage's ``[start, end)`` layer range: ``num_layers // num_stages`` layers each,
    and the ``num_layers % num_stages`` left over one each to the stages just before the
    last (vLLM's default partition: the last stage also runs the final norm, the LM head
    and the sampler, the first the embedding, which costs little). With one left over it
    goes to the stage before the last: 5 layers over 2 stages split 3 + 2."""
    check_pipeline_fit(num_layers, num_stages)
    sizes = [num_layers // num_stages] * num_stages
    for i in range(2, num_layers % num_stages + 2):
        sizes[-i] += 1
    ranges = []
    start = 0
    for size in sizes:
        ranges.append((start, start + size))
        start += size
    return ranges


def check_pipeline_fit(num_layers: int, num_stages: int) -> None:
    """Raise ``ConfigError`` unless every stage gets at least one layer."""
    if num_stages < 1:
        raise ConfigError("pipeline_parallel_size must be at least 1")
    if num_stages > num_layers:
        raise ConfigError(
            f"pipeline_parallel_size={num_stages} exceeds the model's {num_layers} decoder "
            f"layers: every stage needs at least one layer (use at most {num_layers})"
        )


def describe_split(num_layers: int, num_stages: int, tied_head: bool = False) -> list[str]:
    """One line per stage, as ``tessellm plugins --model M`` prints it."""
    lines = []
    for stage, (start, end) in enumerate(layer_split(num_layers, num_stages)):
        extras = []
        if stage == 0:
            extras.append("embedding")
        if stage == num_stages - 1:
            extras.append(
                "final norm, LM head" + (" (tied: + embedding)" if stage and tied_head else "")
            )
        extra = f" + {', '.join(extras)}" if extras else ""
        lines.append(f"stage {stage}: layers {start}-{end - 1} ({end - start}){extra}")
    return lines


@dataclass(frozen=True, slots=True)
class PipelineStage:
    """This rank's stage: its layer range and the global ranks it exchanges with."""

    stage: int
    num_stages: int
    start_layer: int
    end_layer: int
    prev_rank: int | None  # global rank that sends this rank its inputs (None: first stage)
    next_rank: int | None  # global rank this rank sends its outputs to (None: last stage)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def holds(self, layer_idx: int) -> bool:
        return self.start_layer <= layer_idx < self.end_layer

    @classmethod
    def of(cls, global_rank: int, tp: int, num_stages: int, num_layers: int) -> PipelineStage:
        stage, tp_rank = divmod(global_rank, tp)
        start, end = layer_split(num_layers, num_stages)[stage]
        prev_rank = (stage - 1) * tp + tp_rank if stage > 0 else None
        next_rank = (stage + 1) * tp + tp_rank if stage < num_stages - 1 else None
        return cls(stage, num_stages, start, end, prev_rank, next_rank)
