"""The CPU platform for tessellm."""
