"""fp8 (float8_e4m3fn W8A8) quantization for tessellm: the ``fp8`` method."""
