"""A griffe extension for the docs build: the codebase's docstrings are reST-ish prose.

``:class:`X``` and its siblings become Markdown: a cross-reference where ``X`` is on a
page of the API reference (so a stale name fails the strict build), inline code
elsewhere. A paragraph ending in ``::`` (reST's literal-block marker) ends in ``:``, and a
``::`` alone on its line goes. Names re-exported from a module documented on its own page
are not documented again.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

# Modules rendered in docs/reference/: references into them are checked links.
_DOCUMENTED_PREFIXES = ("tessellm.hookspecs.", "tessellm.interfaces.", "tessellm.testing.")
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
_LITERAL_MARKER = re.compile(r"(\S)::$", re.MULTILINE)
_BARE_LITERAL_MARKER = re.compile(r"^[ \t]*::[ \t]*$", re.MULTILINE)


def _role_to_markdown(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if target.startswith(_DOCUMENTED_PREFIXES):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def rest_to_markdown(text: str) -> str:
    text = _ROLE.sub(_role_to_markdown, text)
    return _BARE_LITERAL_MARKER.sub("", _LITERAL_MARKER.sub(r"\1:", text))


def _documented_elsewhere(module: griffe.Module, name: str) -> bool:
    member = module.members.get(name)
    return (
        member is not None
        and member.is_alias
        and member.target_path.startswith(_DOCUMENTED_PREFIXES)
        and not member.target_path.startswith(f"{module.path}.")
    )


class RestRoles(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rest_to_markdown(obj.docstring.value)
        # A name a module re-exports (``__all__``) from a module with its own reference
        # page is documented there, once; the re-exporting page would repeat it.
        if isinstance(obj, griffe.Module) and obj.exports:
            obj.exports = [
                name
                for name in obj.exports
                if not (isinstance(name, str) and _documented_elsewhere(obj, name))
            ]
