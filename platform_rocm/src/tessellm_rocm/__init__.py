"""The AMD ROCm platform for tessellm."""
