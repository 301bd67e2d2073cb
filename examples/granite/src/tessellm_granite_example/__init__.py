"""IBM Granite for tessellm: an example model family in a package of its own."""
