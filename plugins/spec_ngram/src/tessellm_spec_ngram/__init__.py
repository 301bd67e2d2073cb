"""Speculative decoding by n-gram prompt lookup (``speculative_config={"method": "ngram"}``)."""
