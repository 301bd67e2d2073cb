"""GGUF weight format for tessellm."""
