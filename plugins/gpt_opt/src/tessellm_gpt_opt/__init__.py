"""GPT-2 and OPT model plugin for tessellm."""
