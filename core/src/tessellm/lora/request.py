"""``LoRARequest``: which adapter a request runs with (vLLM's name and fields)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``)
    at ``lora_path``. ``lora_int_id`` (a positive integer) identifies it: requests with the
    same id share its loaded weights and its prefix-cache entries; ``lora_name`` is what
    the server lists and a request's ``model`` names."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        from tessellm.errors import InvalidRequestError

        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int):
            raise InvalidRequestError("lora_int_id must be an integer")
        if self.lora_int_id < 1:
            raise InvalidRequestError("lora_int_id must be a positive integer")
        if not self.lora_name:
            raise InvalidRequestError("lora_name must not be empty")
