"""Root of the command line. Sub-commands come from core's own (``core_commands``) and
from any installed plugin's ``register_commands`` hook."""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

from tessellm.errors import TessellmError


def tessellm_version() -> str:
    try:
        return version("tessellm")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tessellm {tessellm_version()}")
        raise typer.Exit()


def _root(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print tessellm's version and exit.",
        ),
    ] = False,
) -> None:
    """tessellm: fast LLM inference and serving, built from plugins."""


def build_app() -> typer.Typer:
    from tessellm.plugins import get_plugins

    app = typer.Typer(
        rich_markup_mode=None,  # click's plain help: rich's panels cut option names at 80 columns
        name="tessellm",
        help="tessellm: fast LLM inference and serving, built from plugins.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.callback()(_root)
    from tessellm.cli import core_commands

    core_commands.register_commands(app=app)
    plugins = get_plugins()
    assert plugins.manager is not None
    for impl in plugins.manager.hook.register_commands.get_hookimpls():
        name = plugins.manager.get_name(impl.plugin)
        try:
            impl.function(app=app)
        except Exception as exc:  # one broken plugin must not take the CLI down
            print(f"tessellm: plugin {name} failed to add commands: {exc}", file=sys.stderr)
    return app


def main() -> None:
    try:
        build_app()()
    except TessellmError as exc:
        from tessellm.cli.common import exit_code_for

        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code_for(exc)) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
