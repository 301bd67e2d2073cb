"""``tessellm bench``: offline throughput, batch-1 latency and online serving benchmarks.

Each benchmark runs tessellm and, on request, a baseline (HF transformers ``generate``,
llama.cpp through llama-cpp-python) on the same workload in the same process, and reports
a table plus JSON. Nothing here is imported until a ``bench`` command runs.
"""
