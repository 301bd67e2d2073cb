"""Model families are separate plugins: each architecture comes from its family's package, and
without that plugin the engine says which package to install (or which entry point to allow).
"""

from __future__ import annotations

import pytest
from conftest import save_tiny_model
from test_parity_gemma_phi_gpt import CONFIGS

from tessellm import LLM
from tessellm.errors import ModelLoadError
from tessellm.install_hints import FIRST_PARTY_FAMILIES, plugin_hint
from tessellm.plugins import ALLOW_ENV, get_plugins

ARCHITECTURES = sorted({name.split("-")[0] for name in CONFIGS})
BASE_PLUGINS = "platform_cpu,attention_torch,gguf"


def test_every_known_architecture_comes_from_the_plugin_the_table_names():
    plugins = get_plugins(refresh=True)
    for architecture, family in FIRST_PARTY_FAMILIES.items():
        registration = plugins.get("models", architecture)
        assert registration is not None, f"{family.distribution} is not installed"
        assert registration.plugin == family.entry_point, architecture


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_disallowed_family_fails_naming_its_entry_point(architecture, tmp_path, monkeypatch):
    config = CONFIGS[architecture]()
    config.architectures = [architecture]
    path = save_tiny_model(config, tmp_path / architecture)
    entry_point = FIRST_PARTY_FAMILIES[architecture].entry_point
    others = {family.entry_point for family in FIRST_PARTY_FAMILIES.values()} - {entry_point}
    monkeypatch.setenv(ALLOW_ENV, ",".join([BASE_PLUGINS, *sorted(others)]))
    try:
        plugins = get_plugins(refresh=True)
        assert plugins.get("models", architecture) is None
        with pytest.raises(ModelLoadError) as failure:
            LLM(model=str(path), dtype="float32", device="cpu")
        message = str(failure.value)
        assert f"no plugin provides model '{architecture}'" in message
        assert f"add '{entry_point}' to {ALLOW_ENV}" in message
    finally:
        monkeypatch.undo()
        get_plugins(refresh=True)


def test_missing_family_names_the_package_to_install():
    gemma = FIRST_PARTY_FAMILIES["Gemma3ForCausalLM"]
    assert "pip install tessellm-gemma" in plugin_hint(gemma, None, set())
    opt = FIRST_PARTY_FAMILIES["OPTForCausalLM"]
    assert "pip install tessellm-gpt-opt" in plugin_hint(opt, {"llama"}, {"llama"})
    assert "model-family plugin" in plugin_hint(None, None, set())


def test_a_plugin_registers_its_own_install_hint(monkeypatch):
    from tessellm import hookimpl
    from tessellm.hookspecs import InstallHint
    from tessellm.plugins import register_plugin

    class Hints:
        TESSELLM_PLUGIN_API = ">=1.0,<2"

        @hookimpl
        def register_install_hints(self, register):
            register("GraniteMoeForCausalLM", InstallHint("tessellm-granite", "granite"))

    try:
        plugins = register_plugin(Hints(), "granite-hints")
        message = plugins.missing_message("models", "GraniteMoeForCausalLM")
        assert "pip install tessellm-granite" in message
    finally:
        get_plugins(refresh=True)
