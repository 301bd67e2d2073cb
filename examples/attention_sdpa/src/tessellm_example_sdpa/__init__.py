"""An example attention backend package for tessellm (see README.md)."""
