"""The packages ``tessellm new-plugin`` writes, one template module per kind of plugin.

Each kind's module gives the kind-specific text (the hooks, one implementation file, its
test, a few README lines); :mod:`.common` the files every package has. All are
``string.Template`` text, so they live in ``.py`` modules and install with tessellm.
"""

from __future__ import annotations

from string import Template
from types import ModuleType

from tessellm.cli.plugin_templates import attention, common, model, platform, quantization

KINDS: dict[str, ModuleType] = {
    "model": model,
    "platform": platform,
    "attention": attention,
    "quantization": quantization,
}

# The class each kind's implementation file defines, from the CamelCase of the name.
_CLASS_SUFFIX = {
    "platform": "Platform",
    "attention": "Attention",
    "quantization": "WeightOnlyInt8",
}


def camel_case(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def distribution_name(name: str) -> str:
    return "tessellm-" + name.replace("_", "-")


def render(kind: str, name: str, api_range: str, architecture: str | None = None) -> dict[str, str]:
    """The package's files (relative path -> text) for a ``kind`` plugin called ``name``.

    ``architecture`` (model plugins only) is the HF architecture the family serves; its
    class takes that name."""
    template = KINDS[kind]
    package = f"tessellm_{name}"
    if kind == "model":
        architecture = architecture or model.DEFAULT_ARCHITECTURE
        class_name = architecture
    else:
        class_name = camel_case(name) + _CLASS_SUFFIX[kind]
    values = {
        "kind": kind,
        "name": name,
        "dist": distribution_name(name),
        "package": package,
        "class_name": class_name,
        "architecture": architecture or "",
        "api_range": api_range,
        "impl_module": template.IMPL_MODULE,
        "dependencies": ", ".join(f'"{dep}"' for dep in _dependencies(kind)),
    }

    def fill(text: str) -> str:
        return Template(text).substitute(values)

    # Summaries may use the values above; then they are values of the common files.
    values["description"] = fill(template.DESCRIPTION)
    values["impl_summary"] = fill(template.IMPL_SUMMARY)
    values["test_summary"] = fill(template.TEST_SUMMARY)
    values["usage"] = fill(template.USAGE).rstrip("\n")
    values["imports"] = fill(template.PLUGIN_IMPORTS)
    src = f"src/{package}"
    return {
        "pyproject.toml": fill(common.PYPROJECT),
        "README.md": fill(common.README),
        f"{src}/__init__.py": fill(common.INIT),
        f"{src}/plugin.py": fill(common.PLUGIN_HEADER) + fill(template.PLUGIN),
        f"{src}/{template.IMPL_MODULE}.py": fill(template.IMPL),
        f"tests/test_{name}.py": fill(template.TEST),
    }


def _dependencies(kind: str) -> list[str]:
    deps = ["tessellm>=0.1"]
    if kind == "platform":
        # Its attention_backends preference names the torch backend.
        deps.append("tessellm-attention-torch")
    return deps
