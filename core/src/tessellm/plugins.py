"""Plugin discovery (entry points under the group ``tessellm``) and the lazy registries.

``TESSELLM_PLUGINS`` (comma-separated entry-point names) limits which installed plugins
autoload; core's built-ins always load. A plugin that fails to import, declares a plugin
API range this tessellm is outside of, implements a hook that does not exist, or raises
while registering is recorded in ``PluginSet.failures`` with the reason and skipped; the
others load as usual. A plugin that declares no API range loads with a warning
(``PluginSet.warnings``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tessellm import hookspecs, plugin_checks
from tessellm.errors import PluginError

ENTRY_POINT_GROUP = "tessellm"
ALLOW_ENV = "TESSELLM_PLUGINS"


@dataclass(slots=True)
class Registration:
    kind: str
    name: str
    target: str | object
    plugin: str

    def load(self) -> Any:
        """Import the target (``"module:attr"``) or return it as it is."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
        except Exception as exc:
            raise PluginError(
                f"plugin {self.plugin!r} registered {self.kind} {self.name!r} as "
                f"{self.target!r}, which cannot be imported: {exc}"
            ) from exc
        return obj


@dataclass(slots=True)
class PluginInfo:
    name: str
    distribution: str
    version: str
    registered: list[tuple[str, str]] = field(default_factory=list)
    api_range: str | None = None  # the plugin's TESSELLM_PLUGIN_API, as declared


@dataclass
class PluginSet:
    """Everything the installed plugins registered, by kind (hook name minus ``register_``)."""

    registries: dict[str, dict[str, Registration]] = field(default_factory=dict)
    plugins: dict[str, PluginInfo] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    manager: pluggy.PluginManager | None = None

    def names(self, kind: str) -> list[str]:
        return list(self.registries.get(kind, {}))

    def get(self, kind: str, name: str) -> Registration | None:
        return self.registries.get(kind, {}).get(name)

    def load(self, kind: str, name: str) -> Any:
        reg = self.get(kind, name)
        if reg is None:
            raise PluginError(self.missing_message(kind, name))
        return reg.load()

    def missing_message(self, kind: str, name: str) -> str:
        known = ", ".join(sorted(self.names(kind))) or "none"
        label = kind.rstrip("s").replace("_", " ")
        hint = ""
        if kind in ("models", "quantization_methods"):
            hint = " " + self.install_hint(name, kind)
        return f"no plugin provides {label} {name!r} (known: {known}).{hint}"

    def install_hint(self, name: str, kind: str = "models") -> str:
        """What to install (or allow) to get ``name`` (an architecture, a quantization
        method or checkpoint format), from the registered install hints."""
        from tessellm.install_hints import plugin_hint

        installed = {ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP)}
        known_hint = self.get("install_hints", name)
        target = known_hint.load() if known_hint is not None else None
        return plugin_hint(target, _allowed(), installed, kind)


def _allowed() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _registrar(result: PluginSet, kind: str, plugin: str):
    registry = result.registries.setdefault(kind, {})

    def register(name: str, target: str | object) -> None:
        if name in registry and registry[name].plugin != plugin:
            result.overrides.append(
                f"{kind} {name!r}: {registry[name].plugin} overridden by {plugin}"
            )
        registry[name] = Registration(kind, name, target, plugin)
        info = result.plugins.get(plugin)
        if info is not None:
            info.registered.append((kind, name))

    return register


def _collect(pm: pluggy.PluginManager, result: PluginSet) -> None:
    for hook_name in hookspecs.HOOK_NAMES:
        kind = hook_name.removeprefix("register_")
        result.registries.setdefault(kind, {})
        # Call each implementation on its own so one broken plugin is skipped alone;
        # in registration order, so a later plugin overrides core's defaults.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = pm.get_name(impl.plugin) or "?"
            try:
                impl.function(register=_registrar(result, kind, plugin_name))
            except Exception as exc:
                result.failures[plugin_name] = f"{hook_name} raised {exc!r}"


def discover(builtins: bool = True) -> PluginSet:
    """Load core's built-ins and every allowed entry-point plugin, then collect registrations."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    result = PluginSet(manager=pm)
    if builtins:
        from tessellm import builtin

        pm.register(builtin, name="tessellm.builtin")
        result.plugins["tessellm.builtin"] = PluginInfo(
            "tessellm.builtin", "tessellm", _version(), api_range=hookspecs.PLUGIN_API_VERSION
        )
    allowed = _allowed()
    seen: set[str] = set()
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen or (allowed is not None and ep.name not in allowed):
            continue
        seen.add(ep.name)
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        label = f"plugin {ep.name!r} ({dist} {version})"
        try:
            module = ep.load()
        except Exception as exc:
            result.failures[ep.name] = f"import of {ep.value!r} failed: {exc!r}"
            continue
        problems = _contract_problems(module, label)
        if problems:
            result.failures[ep.name] = "; ".join(problems)
            continue
        try:
            pm.register(module, name=ep.name)
        except Exception as exc:  # pluggy refuses a hook whose arguments the spec lacks
            result.failures[ep.name] = f"{label} cannot be registered: {exc}"
            continue
        warning = plugin_checks.missing_api_range(module, label)
        if warning:
            result.warnings[ep.name] = warning
        result.plugins[ep.name] = PluginInfo(
            ep.name, dist, version, api_range=plugin_checks.declared_api_range(module)
        )
    _collect(pm, result)
    return result


def _contract_problems(module: object, label: str) -> list[str]:
    """Reasons to refuse a loaded plugin module before any of its hooks runs."""
    problems = plugin_checks.hook_problems(module, label)
    api = plugin_checks.api_range_problem(module, label)
    return [api, *problems] if api else problems


def _version() -> str:
    try:
        return md.version("tessellm")
    except md.PackageNotFoundError:
        return "0+unknown"


_lock = threading.Lock()
_cached: PluginSet | None = None


def get_plugins(refresh: bool = False) -> PluginSet:
    """The process-wide plugin set, discovered once (``refresh=True`` discovers again)."""
    global _cached
    with _lock:
        if _cached is None or refresh:
            _cached = discover()
        return _cached


def register_plugin(module: object, name: str) -> PluginSet:
    """Register an in-process plugin object (tests, notebooks) and rebuild the registries.

    Raises ``PluginError`` for a plugin the discovery would refuse (API range, hook names).
    """
    plugins = get_plugins()
    assert plugins.manager is not None
    problems = _contract_problems(module, f"plugin {name!r}")
    if problems:
        raise PluginError("; ".join(problems))
    plugins.manager.register(module, name=name)
    plugins.plugins[name] = PluginInfo(
        name, "(in process)", "-", api_range=plugin_checks.declared_api_range(module)
    )
    plugins.registries.clear()
    for info in plugins.plugins.values():
        info.registered.clear()
    _collect(plugins.manager, plugins)
    return plugins
