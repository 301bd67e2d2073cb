"""Checks of what a request carries, against this engine's model and configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tessellm.errors import InvalidRequestError
from tessellm.lora.adapter import read_adapter_config
from tessellm.lora.request import LoRARequest
from tessellm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tessellm.config import EngineArgs
    from tessellm.engine.structured_output import StructuredOutputManager


class RequestValidation:
    """``LLMEngine``'s request checks (it mixes them in)."""

    args: EngineArgs
    max_token_id: int
    vocab_size: int
    max_model_len: int
    structured: StructuredOutputManager
    _checked_adapters: set[tuple[int, str]]

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``InvalidRequestError`` for a prompt or parameters this model cannot run."""
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        top = self.max_token_id
        if any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= top for t in token_ids
        ):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {top}]")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, leaving no room to generate"
            )
        self.validate_params(params)

    def validate_params(self, params: SamplingParams) -> None:
        """What ``SamplingParams`` checks, plus the bounds that depend on this model: token
        ids within its vocabulary, ``top_k`` and logprobs no more than it has."""
        params.validate()  # again: the caller may have changed the object since
        top, vocab = self.max_token_id, self.vocab_size
        if params.top_k > vocab:
            raise InvalidRequestError(
                f"top_k must be at most the vocabulary size {vocab} (or -1/0 for off), "
                f"got {params.top_k}"
            )
        if any(t > top for t in params.stop_token_ids or ()):
            raise InvalidRequestError(f"stop_token_ids must be token ids in [0, {top}]")
        if any(t > top for t in params.logit_bias or {}):
            raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {top}]")
        limit = min(self.args.max_logprobs, vocab)
        if params.logprobs is not None and params.logprobs > limit:
            raise InvalidRequestError(f"logprobs must be at most {limit}")
        if params.prompt_logprobs is not None and params.prompt_logprobs > limit:
            raise InvalidRequestError(f"prompt_logprobs must be at most {limit}")
        if params.structured_outputs is not None:
            self.structured.backend_name(params.structured_outputs)

    def validate_lora(self, lora_request: LoRARequest) -> None:
        """``InvalidRequestError`` unless the engine runs LoRA and the adapter's config is
        one it can run (read once per adapter id and path)."""
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError("lora_request must be a tessellm.lora.LoRARequest")
        if not self.args.enable_lora:
            raise InvalidRequestError("LoRA adapters need an engine started with enable_lora=True")
        key = (lora_request.lora_int_id, lora_request.lora_path)
        if key not in self._checked_adapters:
            read_adapter_config(lora_request.lora_path, self.args.max_lora_rank)
            self._checked_adapters.add(key)
