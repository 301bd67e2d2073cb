"""The example plugins, installed next to the checkout, as a user meets them: listed by
``tessellm plugins`` with the class and distribution serving each role, passed by
``tessellm doctor``, and serving OpenAI-client requests from a real ``tessellm serve``
whose tokens are HF's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tessellm.testing import hf_greedy

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"
GRANITE_KNOBS = dict(embedding_multiplier=6.0, residual_multiplier=0.35, attention_multiplier=0.09)


def tessellm_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "tessellm.cli.app", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def granite(tmp_path_factory) -> Path:
    from tessellm.testing import tiny_model

    return tiny_model("GraniteForCausalLM", tmp_path_factory.mktemp("granite"), **GRANITE_KNOBS)


def test_plugins_names_the_example_classes_and_distributions(granite):
    shown = tessellm_cli(
        "plugins", "--model", str(granite), "--device", "cpu", "--attention-backend", "sdpa"
    )
    assert shown.returncode == 0, shown.stderr
    roles = shown.stdout.split("serving roles:")[1]
    assert "tessellm_granite_example.model:GraniteForCausalLM" in roles
    assert "tessellm-granite-example 0.1.0" in roles
    assert "tessellm_example_sdpa.backend:" in roles
    assert "tessellm-example-sdpa 0.1.0" in roles


@pytest.mark.parametrize("plugin", ["granite_example", "example_sdpa"])
def test_doctor_passes_the_example(plugin):
    checked = tessellm_cli("doctor", "--plugin", plugin)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "PASS" in checked.stdout


def test_a_server_with_both_examples_answers_with_hf_tokens(granite, tmp_path):
    from openai import OpenAI
    from transformers import AutoTokenizer

    from tessellm import LLM, SamplingParams

    sys.path.insert(0, str(TESTS_DIR))
    try:
        from server_harness import start_server
    finally:
        sys.path.remove(str(TESTS_DIR))

    prompts = ["The capital of France is", "Hello , my name is"]
    tokenizer = AutoTokenizer.from_pretrained(granite)
    expected = hf_greedy(granite, [tokenizer.encode(p) for p in prompts], 8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    offline = LLM(model=str(granite), dtype="float32", device="cpu", attention_backend="sdpa")
    outputs = [o.outputs[0] for o in offline.generate(prompts, params)]
    assert [list(o.token_ids) for o in outputs] == expected
    assert "sdpa" in offline.engine.describe()["attention"]

    server = start_server(granite, tmp_path, "--attention-backend", "sdpa")
    try:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        model = client.models.list().data[0].id
        reply = client.completions.create(
            model=model,
            prompt=prompts,
            max_tokens=8,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        texts = [c.text for c in sorted(reply.choices, key=lambda c: c.index)]
        assert texts == [o.text for o in outputs]
    finally:
        assert server.stop() == 0, server.log()
