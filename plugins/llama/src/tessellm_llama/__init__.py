"""Llama-family model plugin for tessellm."""
