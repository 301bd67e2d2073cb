"""The OpenAI-compatible HTTP server (``tessellm serve``); needs the ``tessellm[serve]`` extra."""
