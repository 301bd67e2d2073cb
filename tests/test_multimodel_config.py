"""Which models a server serves: repeatable --model with --served-model-name, and
--models-config files (YAML or JSON) with per-model engine arguments and adapters; bad
files and clashing names are clear errors before anything loads."""

from __future__ import annotations

import json
import subprocess

import pytest
from server_harness import cli_command

from tessellm.config import EngineArgs
from tessellm.errors import ConfigError
from tessellm.server.models_config import build_model_specs, read_models_config

BASE = EngineArgs(model="first", dtype="float32", max_num_seqs=8)


def test_repeated_models_get_one_name_each_and_share_the_command_line_flags():
    specs = build_model_specs(BASE, ["/m/a", "/m/b"], ["a", "b"], [])
    assert [s.names for s in specs] == [["a"], ["b"]]
    assert [s.args.model for s in specs] == ["/m/a", "/m/b"]
    assert all(s.args.dtype == "float32" and s.args.max_num_seqs == 8 for s in specs)
    assert specs[1].args.served_model_name == "b"
    unnamed = build_model_specs(BASE, ["/m/a", "/m/b"], [], [])
    assert [s.names for s in unnamed] == [["/m/a"], ["/m/b"]]
    # One model keeps every name it is given (aliases), as before.
    assert build_model_specs(BASE, ["/m/a"], ["x", "y"], [])[0].names == ["x", "y"]
    with pytest.raises(ConfigError, match="one name per --model"):
        build_model_specs(BASE, ["/m/a", "/m/b"], ["a"], [])


def test_a_yaml_config_overrides_engine_arguments_per_model(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - model: /m/llama\n"
        "    served_model_name: llama\n"
        "    max_model_len: 256\n"
        "    lora_modules: [sql=/a/sql]\n"
        "  - model: /m/qwen\n"
        "    served_model_name: [qwen, qwen-latest]\n"
        "    dtype: bfloat16\n"
        "    data_parallel_size: 2\n"
        "    lora_modules: {chat: /a/chat}\n"
    )
    specs = build_model_specs(BASE, [], [], read_models_config(str(path)))
    llama, qwen = specs
    assert llama.names == ["llama"] and llama.args.max_model_len == 256
    assert llama.args.dtype == "float32"  # the command line's, not overridden
    assert llama.lora_modules == [("sql", "/a/sql")] and llama.args.enable_lora
    assert qwen.names == ["qwen", "qwen-latest"] and qwen.args.dtype == "bfloat16"
    assert qwen.data_parallel_size == 2 and qwen.lora_modules == [("chat", "/a/chat")]
    assert qwen.args.max_model_len is None


def test_a_json_config_follows_the_command_line_models(tmp_path):
    path = tmp_path / "models.json"
    entries = [{"model": "/m/b", "lora_modules": [{"name": "x", "path": "/a/x"}]}]
    path.write_text(json.dumps(entries))
    specs = build_model_specs(BASE, ["/m/a"], ["a"], read_models_config(str(path)))
    assert [s.names for s in specs] == [["a"], ["/m/b"]]
    assert specs[1].lora_modules == [("x", "/a/x")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "non-empty list"),
        ("- served_model_name: x\n", "must be a mapping with a 'model'"),
        ("- model: /m/a\n  max_model_length: 5\n", "unknown engine argument.*max_model_length"),
        ("- model: /m/a\n  dtype: float8\n", "unknown dtype"),
        ("- model: /m/a\n  data_parallel_size: 0\n", "data_parallel_size"),
        ("- model: /m/a\n  lora_modules: [nopath]\n", "expected name=path"),
        ("- {model: /m/a, served_model_name: x}\n- {model: /m/b, served_model_name: x}\n",
         "'x' is served twice"),
        ("- {model: /m/a, lora_modules: [x=/p]}\n- {model: /m/b, served_model_name: x}\n",
         "'x' is served twice"),
        ("models: [model: /m/a\n", "not valid YAML or JSON"),
    ],
)  # fmt: skip
def test_bad_configs_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_model_specs(BASE, [], [], read_models_config(str(path)))


def test_serve_refuses_a_bad_config_before_loading(tmp_path):
    missing = subprocess.run(
        cli_command("serve", "--models-config", str(tmp_path / "none.yaml")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2
    assert "--models-config: cannot read" in missing.stderr
    path = tmp_path / "models.yaml"
    path.write_text(
        "- model: /m/a\n  served_model_name: a\n- model: /m/b\n  served_model_name: a\n"
    )
    twice = subprocess.run(
        cli_command("serve", "--models-config", str(path)), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert twice.returncode == 2 and "'a' is served twice" in twice.stderr


def test_serve_exits_when_the_default_model_cannot_load(tmp_path):
    bad = subprocess.run(
        cli_command("serve", "--model", str(tmp_path / "none"), "--model", str(tmp_path / "b"),
                    "--port", "0", "--device", "cpu"),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert bad.returncode == 2, bad.stderr
    assert "Error: the model " in bad.stderr and "could not be loaded" in bad.stderr
