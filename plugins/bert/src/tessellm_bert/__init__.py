"""BERT encoders for tessellm's pooling engine."""
