"""Phi-3 model plugin for tessellm."""
