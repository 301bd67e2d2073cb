"""Plugins found through real entry points: a third-party family, the allow-list, failures."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from conftest import save_tiny_model, tiny_llama_config

from tessellm import LLM, SamplingParams
from tessellm.errors import ModelLoadError
from tessellm.plugins import get_plugins

THIRD_PARTY = textwrap.dedent(
    """
    from tessellm import hookimpl

    @hookimpl
    def register_models(register):
        register("ToyLlamaForCausalLM", "toy_family.model:ToyLlama")
    """
)

TOY_MODEL = textwrap.dedent(
    """
    from tessellm_llama.model import LlamaForCausalLM

    class ToyLlama(LlamaForCausalLM):
        forward_calls = 0

        def forward(self, input_ids, positions, metadata):
            type(self).forward_calls += 1
            return super().forward(input_ids, positions, metadata)
    """
)


def install_distribution(site, name: str, files: dict[str, str], entry_points: str) -> None:
    """Lay out an installed distribution (package + dist-info) the way pip would."""
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    yield site
    for mod in [m for m in sys.modules if m.startswith(("toy_family", "broken_plugin", "vplug"))]:
        del sys.modules[mod]
    get_plugins(refresh=True)


@pytest.fixture
def toy_model(tmp_path):
    path = save_tiny_model(tiny_llama_config(num_hidden_layers=2), tmp_path / "toy")
    # save_pretrained writes HF's own class name; the toy family claims its own.
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["ToyLlamaForCausalLM"]
    config_file.write_text(json.dumps(config))
    return path


def test_third_party_family_is_found_and_used(site, toy_model, monkeypatch):
    monkeypatch.delenv("TESSELLM_PLUGINS", raising=False)
    install_distribution(
        site,
        "toy_family",
        {"toy_family/__init__.py": THIRD_PARTY, "toy_family/model.py": TOY_MODEL},
        "[tessellm]\ntoy = toy_family\n",
    )
    plugins = get_plugins(refresh=True)
    assert plugins.get("models", "ToyLlamaForCausalLM").plugin == "toy"
    assert "toy_family.model" not in sys.modules  # registration is lazy

    llm = LLM(model=str(toy_model), dtype="float32", device="cpu")
    out = llm.generate("Hello , my name is", SamplingParams(temperature=0, max_tokens=4))
    from toy_family.model import ToyLlama

    assert ToyLlama.forward_calls >= 4
    assert len(out[0].outputs[0].token_ids) == 4


def test_allow_list_hides_a_plugin(site, toy_model, monkeypatch):
    install_distribution(
        site,
        "toy_family",
        {"toy_family/__init__.py": THIRD_PARTY, "toy_family/model.py": TOY_MODEL},
        "[tessellm]\ntoy = toy_family\n",
    )
    monkeypatch.setenv("TESSELLM_PLUGINS", "platform_cpu,attention_torch,llama")
    plugins = get_plugins(refresh=True)
    assert "toy" not in plugins.plugins
    with pytest.raises(ModelLoadError, match="no plugin provides model 'ToyLlamaForCausalLM'"):
        LLM(model=str(toy_model), dtype="float32", device="cpu")


def test_broken_plugin_is_reported_and_skipped(site, tiny_llama, monkeypatch):
    monkeypatch.delenv("TESSELLM_PLUGINS", raising=False)
    install_distribution(
        site,
        "broken_plugin",
        {"broken_plugin/__init__.py": "raise ImportError('missing native library')\n"},
        "[tessellm]\nbroken = broken_plugin\n",
    )
    plugins = get_plugins(refresh=True)
    assert "missing native library" in plugins.failures["broken"]
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    assert llm.generate("A", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_platform_and_backend_choices_are_explained(tiny_llama):
    from tessellm.config import EngineArgs
    from tessellm.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=str(tiny_llama), dtype="float32", device="cpu"))
    described = engine.describe()
    assert described["platform"].startswith("platform: cpu")
    assert "attention:" in described["attention"]


def _install_plugin(site, name: str, source: str) -> None:
    install_distribution(
        site,
        name,
        {f"{name}/__init__.py": textwrap.dedent(source)},
        f"[tessellm]\n{name} = {name}\n",
    )


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            """
            from tessellm import hookimpl
            TESSELLM_PLUGIN_API = ">=2.0,<3"
            @hookimpl
            def register_models(register):
                register("VForCausalLM", "vplug_a:Nothing")
            """,
            "supports tessellm plugin API >=2.0,<3, but this tessellm provides 1.4.0",
        ),
        (
            """
            from tessellm import hookimpl
            TESSELLM_PLUGIN_API = "version one please"
            @hookimpl
            def register_models(register):
                register("VForCausalLM", "vplug_a:Nothing")
            """,
            "is not a version range",
        ),
        (
            """
            from tessellm import hookimpl
            TESSELLM_PLUGIN_API = ">=1.0,<2"
            @hookimpl
            def register_model(register):
                register("VForCausalLM", "vplug_a:Nothing")
            """,
            "'register_model' is not a tessellm hook (did you mean 'register_models'?)",
        ),
        (
            """
            TESSELLM_PLUGIN_API = ">=1.0,<2"
            def register_models(register):
                register("VForCausalLM", "vplug_a:Nothing")
            """,
            "'register_models' is not marked @hookimpl",
        ),
        (
            """
            from tessellm import hookimpl
            TESSELLM_PLUGIN_API = ">=1.0,<2"
            @hookimpl
            def register_models(register, extra):
                register("VForCausalLM", "vplug_a:Nothing")
            """,
            "cannot be registered",
        ),
    ],
    ids=["api-range", "bad-range", "misspelled-hook", "unmarked-hook", "bad-arguments"],
)
def test_an_unfit_plugin_is_refused_with_its_reason_and_the_rest_load(
    site, tiny_llama, monkeypatch, request, source, reason
):
    monkeypatch.delenv("TESSELLM_PLUGINS", raising=False)
    # A module name of its own per case: a module imported by an earlier case is not reused.
    name = "vplug_" + request.node.callspec.id.replace("-", "_")
    _install_plugin(site, name, source)
    plugins = get_plugins(refresh=True)
    assert name not in plugins.plugins
    assert reason in plugins.failures[name]
    assert f"plugin '{name}' ({name} 0.1)" in plugins.failures[name]
    assert plugins.get("models", "VForCausalLM") is None
    # Every other plugin still loads and serves.
    assert plugins.get("models", "LlamaForCausalLM") is not None
    llm = LLM(model=str(tiny_llama), dtype="float32", device="cpu")
    assert llm.generate("A", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_a_plugin_without_a_declared_range_loads_with_a_warning(site, monkeypatch):
    monkeypatch.delenv("TESSELLM_PLUGINS", raising=False)
    _install_plugin(
        site,
        "vplug_b",
        """
        from tessellm import hookimpl
        @hookimpl
        def register_models(register):
            register("VbForCausalLM", "vplug_b:Nothing")
        """,
    )
    plugins = get_plugins(refresh=True)
    assert plugins.get("models", "VbForCausalLM").plugin == "vplug_b"
    assert "declares no TESSELLM_PLUGIN_API" in plugins.warnings["vplug_b"]


def test_every_in_tree_plugin_declares_a_range_this_version_satisfies():
    plugins = get_plugins(refresh=True)
    assert not plugins.failures
    assert not plugins.warnings
    for info in plugins.plugins.values():
        if info.distribution.startswith("tessellm"):
            assert info.api_range is not None, info.name


def test_register_plugin_refuses_a_misspelled_hook():
    from tessellm import hookimpl
    from tessellm.errors import PluginError
    from tessellm.plugins import register_plugin

    class Misspelled:
        @hookimpl
        def register_attention_backend(self, register):
            raise AssertionError("never called")

    with pytest.raises(PluginError, match="did you mean 'register_attention_backends'"):
        register_plugin(Misspelled(), "misspelled")
