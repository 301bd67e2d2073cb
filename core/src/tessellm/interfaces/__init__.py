"""The seams between core and plugins: small abstract classes, each a handful of methods."""
