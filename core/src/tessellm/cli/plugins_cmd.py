"""``tessellm plugins``: what is installed, what each registered, and what would be chosen."""

from __future__ import annotations

from typing import Annotated

import typer


def plugins(
    model: Annotated[
        str | None,
        typer.Option(help="Also explain the attention-backend choice for this model."),
    ] = None,
) -> None:
    """List plugins, their versions and registrations, and the platform chosen here."""
    from tessellm.errors import TessellmError
    from tessellm.plugins import get_plugins
    from tessellm.selection import choose_platform

    found = get_plugins()
    for info in found.plugins.values():
        typer.echo(f"{info.name}  ({info.distribution} {info.version})")
        for kind, name in info.registered:
            typer.echo(f"    {kind}: {name}")
    for name, why in found.failures.items():
        typer.echo(f"{name}  FAILED: {why}")
    for line in found.overrides:
        typer.echo(f"override: {line}")
    typer.echo("")
    try:
        platform, choice = choose_platform(found)
    except TessellmError as exc:
        typer.echo(f"platform: none ({exc})")
        raise typer.Exit(1) from None
    typer.echo(choice.explain("platform"))
    typer.echo(f"  attention preference: {', '.join(platform.attention_backends)}")
    if model:
        _explain_model(found, platform, model)


def _explain_model(found, platform, model: str) -> None:
    from tessellm import model_loader as ml
    from tessellm.config import EngineArgs
    from tessellm.selection import choose_attention_backend

    args = EngineArgs(model=model)
    resolved = ml.resolve_model(found, model, args.cache_dir)
    config = ml.weight_format(found, resolved).load_config(resolved.path)
    dtype = platform.default_dtype()
    spec = ml.attention_spec(config, platform.device_type, dtype, args.block_size, 1)
    typer.echo(f"model: {ml.architecture_of(config)} from {resolved.path} ({resolved.format_name})")
    _, choice = choose_attention_backend(found, platform, spec)
    typer.echo(choice.explain("attention"))
