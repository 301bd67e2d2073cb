"""The NVIDIA CUDA platform for tessellm (also the base of the ROCm platform)."""
