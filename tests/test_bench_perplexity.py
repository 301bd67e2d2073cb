"""``tessellm bench perplexity``: the engine's prompt logprobs give the perplexity HF's
loss gives on the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from tessellm.bench.engine_run import EngineOptions, build_engine, release_engine
from tessellm.bench.perplexity import default_text, score, windows_of
from tessellm.cli.app import build_app
from tessellm.errors import ConfigError


def test_windows_drop_what_scores_nothing():
    assert windows_of(list(range(7)), 3, None) == [[0, 1, 2], [3, 4, 5]]
    assert windows_of(list(range(8)), 3, 1) == [[0, 1, 2]]
    with pytest.raises(ConfigError):
        windows_of([1, 2], 1, None)


def test_the_shipped_text_is_there():
    assert len(default_text().split()) > 500


def test_perplexity_equals_hf_loss_on_the_same_windows(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory("LlamaForCausalLM")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    ids = torch.randint(4, vocab, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = windows_of(ids, 16, None)  # 16, 16, 8 tokens
    engine = build_engine(EngineOptions(model=str(path), dtype="float32", enforce_eager=True))
    try:
        result = score(engine, windows)
    finally:
        release_engine(engine)
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = hf(torch.tensor([window])).logits[0, :-1].double()
            targets = torch.tensor(window[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += len(window) - 1
    assert result.scored_tokens == count == 37 and result.windows == 3
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_the_cli_compares_methods_in_one_run(tiny_model_factory, tmp_path):
    path = tiny_model_factory("LlamaForCausalLM")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["a b c d e f g h"] * 20))
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        build_app(),
        ["bench", "perplexity", "-m", str(path), "--dtype", "float32", "--text-file", str(text),
         "--window", "32", "--method", "none", "--method", "woq_int4",
         "--output-json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["system"] for row in rows] == ["tessellm[none]", "tessellm[woq_int4]"]
    first, second = (row["metrics"] for row in rows)
    assert first["vs_first_pct"] == 0 and first["scored_tokens"] == second["scored_tokens"] > 0
    assert second["quantization"] == "woq_int4" and math.isfinite(second["perplexity"])
