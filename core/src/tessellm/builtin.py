"""Core's own features, registered through the same hooks as any plugin.

Every target is a lazy ``"module:Class"`` string, so this module imports nothing of the
engine. The CLI's own commands are registered by the CLI (``tessellm.cli.core_commands``),
not here: discovery must not import the command line it serves.
"""

from __future__ import annotations

from tessellm.hookspecs import hookimpl


@hookimpl
def register_schedulers(register):
    register("default", "tessellm.engine.scheduler:Scheduler")


@hookimpl
def register_kv_cache_managers(register):
    register("default", "tessellm.engine.kv_cache_manager:KVCacheManager")


@hookimpl
def register_executors(register):
    register("uniproc", "tessellm.executors.uniproc:UniProcExecutor")
    register("mp", "tessellm.executors.mp:MultiprocExecutor")
    register("ray", "tessellm.executors.ray:RayExecutor")


@hookimpl
def register_quantization_methods(register):
    register("none", "tessellm.interfaces.quantization:Unquantized")


@hookimpl
def register_weight_formats(register):
    # Before safetensors: a random-weights directory also has a config.json.
    register("random", "tessellm.formats.random_weights:RandomWeightsFormat")
    register("safetensors", "tessellm.formats.safetensors:SafetensorsFormat")


@hookimpl
def register_model_sources(register):
    register("local", "tessellm.sources.local:LocalPathSource")
    # After local: a folder that looks like org/name is a path first.
    register("hub", "tessellm.sources.hub:HubSource")
    register("pypi-wheel", "tessellm.sources.pypi:PyPIWheelSource")
    register("pypi-archive", "tessellm.sources.pypi_archive:PyPIArchiveSource")
    register("random", "tessellm.sources.random_weights:RandomWeightsSource")


@hookimpl
def register_install_hints(register):
    from tessellm.install_hints import FIRST_PARTY_FAMILIES, FIRST_PARTY_QUANTIZATION

    for name, hint in (FIRST_PARTY_FAMILIES | FIRST_PARTY_QUANTIZATION).items():
        register(name, hint)


@hookimpl
def register_tool_call_parsers(register):
    # Hermes' format is shared by several families (Qwen, Hermes fine-tunes of Llama and
    # Mistral), so it is core's; a family's own format comes with the family's plugin.
    register("hermes", "tessellm.tool_parsers.hermes:HermesToolParser")
