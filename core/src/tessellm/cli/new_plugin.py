"""``tessellm new-plugin``: a plugin package whose tests pass as generated."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import keyword
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tessellm.cli.common import fail


class PluginKind(StrEnum):
    model = "model"
    platform = "platform"
    attention = "attention"
    quantization = "quantization"


def plugin_api_range(version: str) -> str:
    """The range a new plugin declares: this minor release up to the next major one
    (``"1.0.0"`` -> ``">=1.0,<2"``); minor releases only add to the API."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return f">={major}.{minor},<{major + 1}"


def _identifier_problem(value: str, what: str) -> str | None:
    if not value.isidentifier() or keyword.iskeyword(value):
        return f"{what} {value!r} is not a Python identifier (letters, digits, underscores)"
    return None


def new_plugin(
    kind: Annotated[PluginKind, typer.Argument(help="What the plugin provides.")],
    name: Annotated[
        str,
        typer.Argument(
            help="The plugin's name: its entry point, its registered name (platform, "
            "attention backend, quantization method) and the package tessellm_NAME."
        ),
    ],
    directory: Annotated[
        Path | None,
        typer.Option(help="Where to write the package (default: ./tessellm-NAME)."),
    ] = None,
    architecture: Annotated[
        str | None,
        typer.Option(
            help="model only: the HF architecture the family serves (default: "
            "MinistralForCausalLM, which the shared decoder computes as generated)."
        ),
    ] = None,
) -> None:
    """Write a new plugin package whose tests pass as generated.

    The package has a pyproject.toml with the entry point, plugin.py with the hooks and the
    supported plugin API range, one implementation file, a README and a test that uses
    tessellm.testing."""
    from tessellm import PLUGIN_API_VERSION
    from tessellm.cli import plugin_templates

    problem = _identifier_problem(name, "NAME")
    if architecture is not None:
        if kind is not PluginKind.model:
            problem = problem or "--architecture applies to model plugins only"
        problem = problem or _identifier_problem(architecture, "--architecture")
    if problem:
        fail(problem, code=2)
    package = f"tessellm_{name}"
    dist = plugin_templates.distribution_name(name)
    if _installed(dist) or importlib.util.find_spec(package) is not None:
        fail(f"{dist} ({package}) is already installed here; choose another NAME", code=2)
    target = directory or Path(f"tessellm-{name}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        fail(f"{target} already exists and is not an empty directory", code=2)

    api_range = plugin_api_range(PLUGIN_API_VERSION)
    files = plugin_templates.render(kind.value, name, api_range, architecture)
    for rel, text in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    typer.echo(f"wrote {dist} ({kind.value} plugin {name!r}, plugin API {api_range}) to {target}")
    for rel in files:
        typer.echo(f"  {rel}")
    typer.echo(f"next: pip install -e '{target}[test]' && pytest {target / 'tests'}")


def _installed(dist: str) -> bool:
    try:
        md.distribution(dist)
    except md.PackageNotFoundError:
        return False
    return True
