"""Model families are separate plugins: each architecture comes from its family's package, and
without that plugin the engine says which package to install (or which entry point to allow).
"""

from __future__ import annotations

import pytest
from conftest import save_tiny_model
from test_parity_gemma_phi_gpt import CONFIGS

from tessellm import LLM
from tessellm.errors import ModelLoadError
from tessellm.known_families import KNOWN_MODEL_PLUGINS, model_plugin_hint
from tessellm.plugins import ALLOW_ENV, get_plugins

ARCHITECTURES = sorted({name.split("-")[0] for name in CONFIGS})
BASE_PLUGINS = "platform_cpu,attention_torch,gguf"


def test_every_known_architecture_comes_from_the_plugin_the_table_names():
    plugins = get_plugins(refresh=True)
    for architecture, family in KNOWN_MODEL_PLUGINS.items():
        registration = plugins.get("models", architecture)
        assert registration is not None, f"{family.distribution} is not installed"
        assert registration.plugin == family.entry_point, architecture


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_disallowed_family_fails_naming_its_entry_point(architecture, tmp_path, monkeypatch):
    config = CONFIGS[architecture]()
    config.architectures = [architecture]
    path = save_tiny_model(config, tmp_path / architecture)
    entry_point = KNOWN_MODEL_PLUGINS[architecture].entry_point
    others = {family.entry_point for family in KNOWN_MODEL_PLUGINS.values()} - {entry_point}
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
    hint = model_plugin_hint("Gemma3ForCausalLM", allowed=None, installed_entry_points=set())
    assert "pip install tessellm-gemma" in hint
    hint = model_plugin_hint("OPTForCausalLM", allowed={"llama"}, installed_entry_points={"llama"})
    assert "pip install tessellm-gpt-opt" in hint
    unknown = model_plugin_hint("FooForCausalLM", allowed=None, installed_entry_points=set())
    assert "model-family plugin" in unknown
