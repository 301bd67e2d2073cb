"""Core's own sub-commands, added by ``build_app`` before those of installed plugins.

A plugin module like any other (one ``register_commands`` hook), kept in the CLI package
so that plugin discovery (``tessellm.plugins``) never imports the command line.
"""

from __future__ import annotations

import typer

from tessellm.hookspecs import hookimpl


@hookimpl
def register_commands(app: typer.Typer) -> None:
    from tessellm.cli import chat, doctor, generate, new_plugin, plugins_cmd, run_batch, serve
    from tessellm.cli.bench import bench_app
    from tessellm.cli.cache import cache_app

    app.command("generate")(generate.generate)
    app.command("plugins")(plugins_cmd.plugins)
    app.command("serve")(serve.serve)
    app.command("run-batch")(run_batch.run_batch)
    app.command("chat")(chat.chat)
    app.add_typer(bench_app, name="bench")
    app.add_typer(cache_app, name="cache")
    app.command("new-plugin")(new_plugin.new_plugin)
    app.command("doctor")(doctor.doctor)
