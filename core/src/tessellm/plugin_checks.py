"""What a plugin module must satisfy before its hooks are called.

Two checks, both run on the loaded entry-point module before it is registered, so that a
plugin that would misbehave is refused with a reason instead of being half-used:

- its declared plugin API range (``TESSELLM_PLUGIN_API``) admits this tessellm's
  ``PLUGIN_API_VERSION``;
- every function marked ``@hookimpl`` names a hook that exists (pluggy itself would
  accept ``register_model`` and never call it), and no function named like a hook lacks
  the marker (it would be silently ignored too).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from tessellm import hookspecs

_IMPL_MARK = f"{hookspecs.PROJECT_NAME}_impl"


def hook_names() -> list[str]:
    """Every hook a plugin may implement (the functions marked ``@hookspec``)."""
    return sorted(
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT_NAME}_spec")
    )


def declared_api_range(plugin: Any) -> str | None:
    value = getattr(plugin, hookspecs.PLUGIN_API_ATTRIBUTE, None)
    return value if isinstance(value, str) else None


def api_range_problem(plugin: Any, label: str) -> str | None:
    """Why ``plugin`` cannot run against this plugin API, or None if it can (or says nothing:
    a plugin without a declared range is assumed to fit; ``missing_api_range`` reports it)."""
    raw = getattr(plugin, hookspecs.PLUGIN_API_ATTRIBUTE, None)
    if raw is None:
        return None
    fix = f'declare a range such as {hookspecs.PLUGIN_API_ATTRIBUTE} = ">=1.0,<2"'
    if not isinstance(raw, str):
        return f"{label}: {hookspecs.PLUGIN_API_ATTRIBUTE} must be a string; {fix}"
    try:
        supported = SpecifierSet(raw)
    except InvalidSpecifier:
        return f"{label}: {hookspecs.PLUGIN_API_ATTRIBUTE} = {raw!r} is not a version range; {fix}"
    if Version(hookspecs.PLUGIN_API_VERSION) in supported:
        return None
    return (
        f"{label} supports tessellm plugin API {raw}, but this tessellm provides "
        f"{hookspecs.PLUGIN_API_VERSION}: install a release of the plugin made for plugin API "
        f"{Version(hookspecs.PLUGIN_API_VERSION).major}.x (or a tessellm within its range)"
    )


def missing_api_range(plugin: Any, label: str) -> str | None:
    """A warning for a plugin that declares no range (it loads, but nothing protects it)."""
    if hasattr(plugin, hookspecs.PLUGIN_API_ATTRIBUTE):
        return None
    attribute = hookspecs.PLUGIN_API_ATTRIBUTE
    return (
        f"{label} declares no {attribute}; it is loaded as if it supported "
        f'{hookspecs.PLUGIN_API_VERSION} (add {attribute} = ">=1.0,<2")'
    )


def hook_problems(plugin: Any, label: str) -> list[str]:
    """Misspelled or unmarked hook implementations in ``plugin``."""
    known = hook_names()
    problems = []
    for attr in dir(plugin):
        obj = getattr(plugin, attr, None)
        if not callable(obj):
            continue
        opts = getattr(obj, _IMPL_MARK, None)
        if isinstance(opts, dict):
            name = opts.get("specname") or attr
            if name not in known:
                problems.append(
                    f"{label}: @hookimpl {name!r} is not a tessellm hook{_nearest(name)}"
                )
        elif attr in known and _defined_in(obj, plugin):
            problems.append(
                f"{label}: {attr!r} is not marked @hookimpl, so it would never be called "
                "(decorate it with tessellm.hookimpl)"
            )
    return problems


def _nearest(name: str) -> str:
    close = difflib.get_close_matches(name, hook_names(), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else " (see tessellm.hookspecs)"


def _defined_in(obj: Any, plugin: Any) -> bool:
    """Whether ``obj`` is the plugin's own function (not one it imported)."""
    if not inspect.ismodule(plugin):
        return True
    return getattr(obj, "__module__", None) == plugin.__name__
