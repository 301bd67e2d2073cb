"""User-facing entry points: the offline ``LLM`` class (the server lives in ``tessellm.server``)."""
