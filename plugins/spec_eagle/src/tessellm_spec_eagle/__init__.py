"""Speculative decoding with an EAGLE head (``speculative_config={"method": "eagle"}``)."""
