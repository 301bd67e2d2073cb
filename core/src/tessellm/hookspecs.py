"""The hooks a tessellm plugin implements. This module is the plugin author's reference.

A plugin is a module (or object) with functions decorated by ``tessellm.hookimpl`` whose
names match the specs below, published under the entry-point group ``tessellm``::

    # pyproject.toml of your plugin
    [project.entry-points.tessellm]
    my_models = "my_package.plugin"

    # my_package/plugin.py
    from tessellm import hookimpl

    @hookimpl
    def register_models(register):
        register("MyForCausalLM", "my_package.model:MyForCausalLM")

Every ``register_*`` hook receives a ``register`` callback. Registrations are lazy: the
target is a ``"package.module:Attribute"`` string and is imported only when the engine
chooses it, so importing a plugin costs (almost) nothing. A callback may also be given
the object itself instead of a string.

None of the hooks is ``firstresult``: every plugin's implementation is called, and the
engine decides among the registered candidates (by name, by the platform's preference
order, or by capability checks that record why a candidate was refused).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import pluggy

if TYPE_CHECKING:
    import typer

PROJECT_NAME = "tessellm"

PLUGIN_API_VERSION = "1.4.0"
"""The version of the plugin API: these hooks and the seams in ``tessellm.interfaces``.

Semantic versioning: a minor release may add hooks, interface members with defaults and
capability attributes; a member or hook is removed (or its meaning changed) only in a
major release, and only after a minor release in which using it raises
``DeprecationWarning``. A plugin states the versions it supports in its entry-point module::

    TESSELLM_PLUGIN_API = ">=1.0,<2"   # a PEP 440 specifier set

A plugin whose range excludes this version is refused with the reason (``tessellm
plugins`` shows it) and the other plugins load as usual.
"""

PLUGIN_API_ATTRIBUTE = "TESSELLM_PLUGIN_API"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callback passed to every ``register_*`` hook.

    ``register(name, target)`` where ``target`` is ``"module:Attribute"`` (imported lazily)
    or the object itself. Registering a name twice keeps the later plugin's target and
    records the override so ``tessellm plugins`` can show it.
    """

    def __call__(self, name: str, target: str | object) -> None: ...


@hookspec
def register_platforms(register: Register) -> None:
    """Register hardware platforms.

    ``name`` is the platform's short name (``"cpu"``, ``"cuda"``, ...). The target is a
    subclass of :class:`tessellm.interfaces.platform.Platform`. Its classmethod
    ``is_available()`` must be cheap: no heavy imports, no device initialisation.
    """


@hookspec
def register_attention_backends(register: Register) -> None:
    """Register attention backends.

    ``name`` is what platforms list in ``Platform.attention_backends`` and what users pass
    as ``attention_backend=``. The target is a subclass of
    :class:`tessellm.interfaces.attention.AttentionBackend`, which declares its
    capabilities as data and explains refusals through ``validate``.
    """


@hookspec
def register_models(register: Register) -> None:
    """Register model families.

    ``name`` is a Hugging Face architecture name as found in ``config.json``
    (``"LlamaForCausalLM"``). The target is a ``torch.nn.Module`` subclass following
    :class:`tessellm.interfaces.model.CausalLM`.
    """


@hookspec
def register_quantization_methods(register: Register) -> None:
    """Register quantization methods.

    ``name`` is the method's name (``"none"``, ``"gptq"``, ...). The target is a subclass
    of :class:`tessellm.interfaces.quantization.QuantizationMethod`: how a linear layer's
    weights are created, loaded and multiplied.
    """


@hookspec
def register_weight_formats(register: Register) -> None:
    """Register checkpoint readers.

    ``name`` is the format's name (``"safetensors"``, ``"gguf"``). The target is a
    subclass of :class:`tessellm.interfaces.weights.WeightFormat`; the engine asks each in
    turn whether it ``accepts`` the resolved model path.
    """


@hookspec
def register_model_sources(register: Register) -> None:
    """Register places models come from.

    ``name`` is the source's name. The target is a subclass of
    :class:`tessellm.interfaces.weights.ModelSource` that turns the user's ``model=``
    string (a directory, a file, an alias such as ``smollm2-135m-instruct``) into a local
    path. Sources are asked in registration order; the first that ``matches`` wins.
    """


@hookspec
def register_schedulers(register: Register) -> None:
    """Register schedulers (core registers ``"default"``).

    The target is a subclass of :class:`tessellm.interfaces.engine.Scheduler`.
    """


@hookspec
def register_kv_cache_managers(register: Register) -> None:
    """Register KV cache managers (core registers ``"default"``, a paged block manager).

    The target is a subclass of :class:`tessellm.interfaces.engine.KVCacheManager`.
    """


@hookspec
def register_executors(register: Register) -> None:
    """Register executors (core registers ``"uniproc"``, ``"mp"`` and ``"ray"``).

    The target is a subclass of :class:`tessellm.interfaces.engine.Executor`: it owns the
    model runner(s), in this process or in one process per rank.
    """


@hookspec
def register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``tessellm`` command line.

    ``app`` is the root ``typer.Typer``; call ``app.command()(func)`` or
    ``app.add_typer(sub_app, name=...)``. Keep imports inside the command functions so
    that ``tessellm --help`` stays fast.
    """


@hookspec
def register_structured_output_backends(register: Register) -> None:
    """Register grammar backends for structured outputs (``response_format``, tools).

    ``name`` is the backend's name (``"xgrammar"``, ``"llguidance"``), as a request's
    ``structured_outputs.backend`` or ``--structured-outputs-backend`` names it. The target
    is a subclass of
    :class:`tessellm.interfaces.structured_output.StructuredOutputBackend`; the engine
    builds one per tokenizer and compiles grammars with it off the step loop.
    """


@hookspec
def register_tool_call_parsers(register: Register) -> None:
    """Register parsers for the tool-call format of a model family's chat template.

    ``name`` is the parser's name (``"hermes"``, ``"llama3_json"``, ``"mistral"``), as
    ``--tool-call-parser`` names it. The target is a subclass of
    :class:`tessellm.interfaces.tool_parser.ToolCallParser`: it says which architectures
    and chat templates use its format, how a call starts (the trigger that switches
    generation into a constrained call) and how to read calls out of the generated text.
    """


@hookspec
def register_speculative_proposers(register: Register) -> None:
    """Register proposers for speculative decoding.

    ``name`` is the proposer's method, as ``speculative_config["method"]`` names it
    (``"ngram"``, ``"draft_model"``). The target is a subclass of
    :class:`tessellm.interfaces.speculative.Proposer`: it guesses the next tokens of
    running requests; the target model verifies them, so a proposer can make generation
    faster or slower but never change what is generated.
    """


class InstallHint(NamedTuple):
    """Where a component that is not loaded can be found: the distribution to install and,
    if it is known, its entry-point name (to suggest for ``TESSELLM_PLUGINS``)."""

    distribution: str
    entry_point: str | None = None


@hookspec
def register_install_hints(register: Register) -> None:
    """Say which package provides a model architecture or quantization method that may not
    be installed.

    ``name`` is an HF architecture name, a quantization method's name or a checkpoint
    ``quant_method`` (e.g. ``"gptq"``); the target an :class:`InstallHint`. When no loaded
    plugin provides it, the engine's error names the package to install (or the entry
    point to allow). Core registers hints for the first-party
    families this way; a plugin may add hints for the architectures its extras or
    sibling packages provide.
    """


# Plugins that only need to react to the engine's life cycle can implement this.
@hookspec
def engine_started(engine: Any) -> None:
    """Called once after an engine is built and its KV cache allocated."""


HOOK_NAMES: tuple[str, ...] = (
    "register_platforms",
    "register_attention_backends",
    "register_models",
    "register_quantization_methods",
    "register_weight_formats",
    "register_model_sources",
    "register_schedulers",
    "register_kv_cache_managers",
    "register_executors",
    "register_install_hints",
    "register_structured_output_backends",
    "register_tool_call_parsers",
    "register_speculative_proposers",
)

RegisterHook = Callable[[Register], None]
