"""Core's model sources: local paths and the embedded default models."""
