"""The ``tessellm`` command line (typer); plugins add commands via ``register_commands``."""
