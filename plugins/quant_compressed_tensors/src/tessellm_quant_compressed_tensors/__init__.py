"""compressed-tensors checkpoints (as llm-compressor writes them) for tessellm: the
``compressed-tensors`` quantization method."""
