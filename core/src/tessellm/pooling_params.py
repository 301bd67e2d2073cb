"""What an embedding request asks for and what it returns, with vLLM's names.

``LLM.embed(prompts, PoolingParams(dimensions=256))`` returns one
:class:`EmbeddingRequestOutput` per prompt, its vector in ``.outputs.embedding``.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessellm.errors import InvalidRequestError


@dataclass(slots=True)
class PoolingParams:
    """``dimensions``: keep the first ``dimensions`` values (Matryoshka models only; the
    vector is normalised after the cut where the model normalises). ``normalize``: override
    the model's own choice (its sentence-transformers ``Normalize`` module); ``None`` keeps
    it."""

    dimensions: int | None = None
    normalize: bool | None = None

    def validate(self) -> None:
        if self.dimensions is not None and (
            isinstance(self.dimensions, bool)
            or not isinstance(self.dimensions, int)
            or self.dimensions < 1
        ):
            raise InvalidRequestError(
                f"dimensions must be a positive integer, got {self.dimensions!r}"
            )


@dataclass(slots=True)
class EmbeddingOutput:
    """One prompt's embedding (vLLM: ``EmbeddingOutput.embedding``)."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(slots=True)
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt, as vLLM's ``EmbeddingRequestOutput``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
