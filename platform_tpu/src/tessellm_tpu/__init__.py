"""The Google TPU platform for tessellm (through torch_xla)."""
