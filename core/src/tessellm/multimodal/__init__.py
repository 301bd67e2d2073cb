"""Image input: decoding and limits (``images``), the engine's processing (``processor``),
the model runner's encoder cache (``runner``) and chat content parts (``chat``). The
model contract is ``tessellm.interfaces.multimodal``."""
