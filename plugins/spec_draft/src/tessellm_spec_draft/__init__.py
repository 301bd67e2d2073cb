"""Speculative decoding with a draft model (``speculative_config={"method": "draft_model"}``)."""
