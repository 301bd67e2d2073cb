"""State-space model families for tessellm (Mamba2)."""
