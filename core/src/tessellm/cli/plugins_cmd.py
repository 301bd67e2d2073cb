"""``tessellm plugins``: what is installed, what each registered, and what would be chosen.

With ``--model`` it names, for each role, the registration the engine would use, the class
behind it and the distribution that registered it, through the engine's own selection
code (``selection``, ``model_loader``), so the answer is what the engine will do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer

from tessellm.cli.common import fail_with

if TYPE_CHECKING:
    from tessellm.interfaces.platform import Platform
    from tessellm.plugins import PluginSet


def plugins(
    model: Annotated[
        str | None,
        typer.Option(help="Also name what would serve this model, role by role, and why."),
    ] = None,
    device: Annotated[str, typer.Option(help="Platform to explain (as the engine's).")] = "auto",
    dtype: Annotated[str, typer.Option(help="dtype to explain the --model choices for.")] = "auto",
    attention_backend: Annotated[
        str | None, typer.Option(help="Attention backend asked for (default: chosen).")
    ] = None,
    quantization: Annotated[
        str | None, typer.Option(help="Quantization method asked for (default: chosen).")
    ] = None,
    kv_cache_dtype: Annotated[
        str, typer.Option(help="KV cache dtype to explain the attention choice for.")
    ] = "auto",
    pipeline_parallel_size: Annotated[
        int,
        typer.Option(
            "--pipeline-parallel-size", "-pp", min=1, help="Stages to show the split for."
        ),
    ] = 2,
) -> None:
    """List plugins, their versions and registrations, and the platform chosen here."""
    from tessellm.errors import TessellmError
    from tessellm.plugins import get_plugins
    from tessellm.selection import choose_platform

    found = get_plugins()
    for info in found.plugins.values():
        api = f", plugin API {info.api_range}" if info.api_range else ""
        typer.echo(f"{info.name}  ({info.distribution} {info.version}{api})")
        for kind, name in info.registered:
            typer.echo(f"    {kind}: {name}")
        if info.name in found.warnings:
            typer.echo(f"    warning: {found.warnings[info.name]}")
    for name, why in found.failures.items():
        typer.echo(f"{name}  FAILED: {why}")
    for line in found.overrides:
        typer.echo(f"override: {line}")
    typer.echo("")
    try:
        platform, choice = choose_platform(found, device)
    except TessellmError as exc:
        typer.echo(f"platform: none ({exc})")
        raise typer.Exit(1) from None
    typer.echo(choice.explain("platform"))
    typer.echo(f"  attention preference: {', '.join(platform.attention_backends)}")
    if model:
        _explain_model(
            found, platform, choice.chosen or "?", model, dtype, attention_backend, quantization,
            kv_cache_dtype, pipeline_parallel_size,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Role:
    role: str  # what it does for the model
    kind: str  # the registry it comes from
    name: str  # the registered name chosen


def _explain_model(
    found: PluginSet,
    platform: Platform,
    platform_name: str,
    model: str,
    dtype_name: str,
    attention_backend: str | None,
    quantization: str | None,
    kv_cache_dtype: str = "auto",
    pipeline_parallel_size: int = 2,
) -> None:
    from tessellm import model_loader as ml
    from tessellm.config import EngineArgs
    from tessellm.errors import TessellmError
    from tessellm.selection import (
        choose_attention_backend,
        choose_quantization,
        cuda_capability,
        default_dtype_for,
    )

    try:
        args = EngineArgs(model=model, dtype=dtype_name, kv_cache_dtype=kv_cache_dtype)
        resolved = ml.resolve_model(found, model, args.cache_dir)
        config = ml.weight_format(found, resolved).load_config(resolved.path)
        architecture = ml.architecture_of(config)
        auto_dtype = default_dtype_for(found, platform, config, quantization)
        dtype = ml.resolve_dtype(args.dtype, auto_dtype)
        # As the model runner asks, on its first device, for one tensor-parallel rank.
        device_type = platform.device(0).type
        spec = ml.attention_spec(
            config, device_type, dtype, args.block_size, 1, found, args.kv_cache_dtype
        )
        _, attention = choose_attention_backend(found, platform, spec, attention_backend)
        quant = choose_quantization(found, platform, dtype, quantization, config)
        method = quant.name
        quant_cls = found.load("quantization_methods", method)  # an unknown one is an error
        try:
            quant_problems = quant_cls.from_config(quant.method_config()).validate(
                device_type, dtype, cuda_capability(platform.device(0))
            )
        except ValueError as exc:
            quant_problems = [str(exc)]
    except (TessellmError, OSError, ValueError) as exc:
        fail_with(exc)
    dtype_text = str(dtype).removeprefix("torch.")
    typer.echo(f"model: {architecture} from {resolved.path} ({resolved.format_name}), {dtype_text}")
    typer.echo(attention.explain("attention"))
    typer.echo(f"quantization: {method} ({quant.reason})")
    typer.echo(f"  can run: {quant_cls.capabilities.describe()}")
    for problem in quant_problems:
        typer.echo(f"  refused here: {problem}")
    roles = [
        Role("platform", "platforms", platform_name),
        Role("attention backend", "attention_backends", attention.chosen or "?"),
        Role("quantization method", "quantization_methods", method),
        Role("model family", "models", architecture),
        Role("weight format", "weight_formats", resolved.format_name),
        Role("model source", "model_sources", resolved.source_name),
    ]
    rows = [(r.role, r.name, *_provenance(found, r)) for r in roles]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    typer.echo("serving roles:")
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        typer.echo("  " + "  ".join([*cells, row[3]]))
    _explain_pipeline_split(config, pipeline_parallel_size)


def _explain_pipeline_split(config: object, stages: int) -> None:
    """How ``pipeline_parallel_size`` would split the decoder layers (interfaces/pipeline)."""
    from tessellm import model_loader as ml
    from tessellm.errors import ConfigError
    from tessellm.interfaces.pipeline import describe_split

    text = ml.text_config(config)
    layers = getattr(text, "num_hidden_layers", None)
    if not layers:
        return
    typer.echo(f"pipeline split (pipeline_parallel_size={stages}, {layers} layers):")
    try:
        tied = bool(getattr(text, "tie_word_embeddings", False))
        lines = describe_split(int(layers), stages, tied)
    except ConfigError as exc:
        lines = [f"refused: {exc}"]
    for line in lines:
        typer.echo(f"  {line}")


def _provenance(found: PluginSet, role: Role) -> tuple[str, str]:
    """``("module:Qualname", "distribution version (plugin entry point)")`` of a role."""
    from tessellm.errors import TessellmError

    registration = found.get(role.kind, role.name)
    if registration is None:
        return "?", "not registered"
    try:
        target = registration.load()
        where = f"{target.__module__}:{target.__qualname__}"
    except (TessellmError, AttributeError) as exc:
        where = f"{registration.target} ({exc})"
    info = found.plugins.get(registration.plugin)
    dist = f"{info.distribution} {info.version}" if info else "?"
    return where, f"{dist} (plugin {registration.plugin})"
