"""``tessellm new-plugin``: the packages it writes install with pip and pass their own tests.

The slow tests do what a plugin author does: generate, ``pip install`` (into a private
``--target`` directory on ``PYTHONPATH``, so the shared environment never sees the
package), and run the package's pytest in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tessellm import PLUGIN_API_VERSION
from tessellm.cli.app import build_app
from tessellm.cli.new_plugin import plugin_api_range
from tessellm.plugin_checks import api_range_problem, hook_problems

KINDS = ("model", "platform", "attention", "quantization")
IMPLEMENTATION = {
    "model": "model.py",
    "platform": "platform.py",
    "attention": "backend.py",
    "quantization": "method.py",
}


def new_plugin(*args: str):
    return CliRunner().invoke(build_app(), ["new-plugin", *args])


def load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_range_spans_this_minor_release_to_the_next_major():
    assert plugin_api_range("1.0.0") == ">=1.0,<2"
    assert plugin_api_range("2.3.1") == ">=2.3,<3"


@pytest.mark.parametrize("kind", KINDS)
def test_writes_the_package_layout(kind, tmp_path):
    name = f"layout_{kind}"
    target = tmp_path / "pkg"
    result = new_plugin(kind, name, "--directory", str(target))
    assert result.exit_code == 0, result.output
    package = target / "src" / f"tessellm_{name}"
    expected = {
        "pyproject.toml",
        "README.md",
        f"src/tessellm_{name}/__init__.py",
        f"src/tessellm_{name}/plugin.py",
        f"src/tessellm_{name}/{IMPLEMENTATION[kind]}",
        f"tests/test_{name}.py",
    }
    assert {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()} == expected
    meta = tomllib.loads((target / "pyproject.toml").read_text())
    assert meta["project"]["name"] == f"tessellm-{name.replace('_', '-')}"
    assert any(dep.startswith("tessellm>=") for dep in meta["project"]["dependencies"])
    assert meta["project"]["entry-points"]["tessellm"] == {name: f"tessellm_{name}.plugin"}
    assert meta["build-system"]["build-backend"] == "setuptools.build_meta"
    for path in target.rglob("*.py"):
        ast.parse(path.read_text(), filename=str(path))
    # The entry-point module passes the checks discovery makes, with the current range.
    plugin = load_module(package / "plugin.py", f"generated_{name}_plugin")
    assert plugin_api_range(PLUGIN_API_VERSION) == plugin.TESSELLM_PLUGIN_API
    assert api_range_problem(plugin, name) is None
    assert hook_problems(plugin, name) == []
    tests = (target / "tests" / f"test_{name}.py").read_text()
    assert "from tessellm.testing import" in tests


def test_model_family_serves_the_architecture_asked_for(tmp_path):
    target = tmp_path / "pkg"
    result = new_plugin("model", "fam", "--directory", str(target), "--architecture", "OlmoX")
    assert result.exit_code == 0, result.output
    plugin = (target / "src" / "tessellm_fam" / "plugin.py").read_text()
    assert '"OlmoX",\n        "tessellm_fam.model:OlmoX"' in plugin
    assert "class OlmoX(DecoderForCausalLM)" in (target / "src/tessellm_fam/model.py").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (("model", "not-an-identifier"), "not a Python identifier"),
        (("attention", "class"), "not a Python identifier"),
        (("model", "llama"), "already installed"),
        (("platform", "p1", "--architecture", "LlamaForCausalLM"), "model plugins only"),
        (("model", "m1", "--architecture", "Bad-Name"), "not a Python identifier"),
    ],
)
def test_refuses_bad_arguments_with_one_line_and_exit_2(args, message, tmp_path):
    result = new_plugin(*args, "--directory", str(tmp_path / "pkg"))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "pkg").exists()


def test_refuses_a_directory_that_has_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "keep.txt").write_text("mine")
    result = new_plugin("attention", "occupied", "--directory", str(tmp_path / "pkg"))
    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["keep.txt"]


def pip_install(package: Path, site: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run(
        [*pip, "--target", str(site), str(package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_installs_and_its_tests_pass(kind, tmp_path):
    name = f"gen_{kind}"
    package = tmp_path / f"tessellm-{name}"
    result = new_plugin(kind, name, "--directory", str(package))
    assert result.exit_code == 0, result.output
    site = tmp_path / "site"
    pip_install(package, site)
    assert (site / f"tessellm_{name}" / "plugin.py").exists()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    # Tests run from the installed copy: move the sources out of reach.
    (package / "src").rename(tmp_path / "src-moved")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        cwd=package,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    test_source = (package / "tests" / f"test_{name}.py").read_text()
    expected = len(re.findall(r"^def test_", test_source, re.MULTILINE))
    summary = output.strip().splitlines()[-1]
    assert re.match(rf"{expected} passed\b", summary), output  # none skipped or deselected
