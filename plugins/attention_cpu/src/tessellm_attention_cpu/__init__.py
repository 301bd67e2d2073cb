"""Batched paged attention for the CPU platform."""
