"""Paged attention in Triton: a unified prefill kernel and a split-K decode kernel."""
