"""Baselines timed on the same workload as tessellm, in the same run."""

BASELINES = ("hf", "llama.cpp")
