"""Qwen-family model plugin for tessellm: Qwen2, Qwen3 and Qwen3-MoE."""
