"""Triton kernels and their launchers; every launcher is free of host-device syncs."""
