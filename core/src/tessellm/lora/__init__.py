"""LoRA adapters served beside their base model: several in one batch (``enable_lora``)."""

from tessellm.lora.request import LoRARequest

__all__ = ["LoRARequest"]
