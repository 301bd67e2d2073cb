"""Fused Triton kernels that GPU platforms offer to the shared layers (see ``ops``)."""
