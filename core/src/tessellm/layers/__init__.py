"""Shared building blocks for model families: parallel linears, rotary, norms, attention."""
