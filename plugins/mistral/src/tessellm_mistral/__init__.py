"""Mistral-family model plugin for tessellm: Mistral (sliding window) and Mixtral (MoE)."""
