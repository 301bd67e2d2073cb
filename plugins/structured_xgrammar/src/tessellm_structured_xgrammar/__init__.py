"""xgrammar grammar backend for tessellm's structured outputs: the ``xgrammar`` backend."""
