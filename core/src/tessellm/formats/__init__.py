"""Core's checkpoint formats (safetensors); others come from plugins."""
