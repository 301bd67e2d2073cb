"""Reference paged attention in plain torch."""
