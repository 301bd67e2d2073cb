"""4-bit weight quantization for tessellm: GPTQ and AWQ checkpoints, the CPU's weight-only int4."""
