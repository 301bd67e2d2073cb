"""llguidance grammar backend for tessellm structured outputs: the ``llguidance`` backend."""
