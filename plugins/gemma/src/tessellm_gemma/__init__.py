"""Gemma-family model plugin for tessellm."""
