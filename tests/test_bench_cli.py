"""``tessellm bench`` on a tiny model: the commands run and report what they promise.

Only the structure of the reports is checked (systems, metrics, ratios, skipped
baselines); timings are never asserted.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tessellm.bench.workload import LengthRange, make_workload, usable_token_ids
from tessellm.cli.app import build_app
from tessellm.errors import ConfigError

THROUGHPUT_METRICS = {"requests", "elapsed_s", "req_s", "output_tok_s", "total_tok_s"}
LATENCY_METRICS = {"ttft_ms", "tpot_ms", "decode_tok_s", "e2e_s", "e2e_tok_s"}


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(build_app(), list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_throughput_json_has_tessellm_and_hf_rows(tiny_llama, tmp_path):
    out_file = tmp_path / "report.json"
    stdout = run_cli(
        "bench", "throughput", "-m", str(tiny_llama), "--num-prompts", "4",
        "--input-len", "6:10", "--output-len", "3:6", "--dtype", "float32",
        "--baseline", "hf", "--hf-batch-size", "2", "--json", "--output-json", str(out_file),
    )  # fmt: skip
    report = json.loads(stdout)
    assert json.loads(out_file.read_text()) == report
    assert report["benchmark"] == "throughput"
    assert report["settings"]["input_len"] == "6:10"
    assert [row["system"] for row in report["rows"]] == ["tessellm", "hf"]
    for row in report["rows"]:
        assert set(row["metrics"]) >= THROUGHPUT_METRICS
        assert row["metrics"]["requests"] == 4
        assert row["metrics"]["output_tok_s"] > 0
    assert set(report["ratios"]) == {"hf"}
    assert report["machine"]["torch"]


def test_latency_table_and_skipped_llama_cpp(tiny_llama):
    stdout = run_cli(
        "bench", "latency", "-m", str(tiny_llama), "--input-len", "8", "--output-len", "5",
        "--num-iters", "2", "--num-iters-warmup", "0", "--baseline", "llama.cpp",
    )  # fmt: skip
    lines = stdout.splitlines()
    assert lines[0].startswith("tessellm bench latency")
    header = lines[1].split()
    assert header[0] == "system" and set(header) >= LATENCY_METRICS
    assert lines[3].split()[0] == "tessellm"
    # llama.cpp reads GGUF only (and may not be installed): skipped, with the reason.
    assert any(line.startswith("skipped llama.cpp: ") for line in lines)


def test_unknown_baseline_is_refused(tiny_llama):
    result = CliRunner().invoke(
        build_app(), ["bench", "latency", "-m", str(tiny_llama), "--baseline", "vllm"]
    )
    assert result.exit_code != 0
    assert "unknown baseline" in result.output


def test_serve_against_a_running_server(tiny_server):
    stdout = run_cli(
        "bench", "serve", "--base-url", tiny_server.base_url, "--num-prompts", "6",
        "--input-len", "5", "--output-len", "4", "--request-rate", "50",
        "--max-concurrency", "3", "--vocab-size", "200", "--json",
    )  # fmt: skip
    report = json.loads(stdout)
    metrics = report["rows"][0]["metrics"]
    assert metrics["completed"] == 6 and metrics["failed"] == 0
    for name in ("ttft", "tpot", "itl"):
        assert metrics[f"{name}_p50_ms"] is not None
        assert metrics[f"{name}_p99_ms"] >= metrics[f"{name}_p50_ms"]
    assert metrics["output_tok_s"] > 0
    # The client's own event-loop lag, measured beside the requests.
    assert 0 <= metrics["client_lag_p99_ms"] <= metrics["client_lag_max_ms"]
    # One record a request, placed in the run, agreeing with the percentiles.
    records = report["requests"]
    assert len(records) == 6 and all(r["ok"] and r["output_tokens"] > 0 for r in records)
    assert all(0 <= r["sent_s"] <= report["rows"][0]["metrics"]["elapsed_s"] for r in records)
    assert max(r["ttft_ms"] for r in records) == pytest.approx(metrics["ttft_p99_ms"], abs=1e-2)
    assert all(r["e2e_ms"] >= r["ttft_ms"] for r in records)


def test_serve_with_text_prompts_for_servers_without_token_ids(tiny_server, tiny_llama):
    from tessellm.bench.serve import ServeSettings, _tokenizer, run_serve, text_of_length

    settings = ServeSettings(
        base_url=tiny_server.base_url, num_prompts=3, input_len=LengthRange(24, 24),
        output_len=LengthRange(3, 3), tokenizer=str(tiny_llama), text_prompts=True,
        ignore_eos=False,
    )  # fmt: skip
    report = run_serve(settings)
    metrics = report.rows[0].metrics
    assert metrics["completed"] == 3 and metrics["failed"] == 0
    # The prompts' length is the server's count (usage), about the length asked for.
    assert all(22 <= r["input_tokens"] <= 25 for r in report.requests)
    tokenizer = _tokenizer(str(tiny_llama))
    ids = list(range(40, 80))  # the tiny vocabulary has 256 ids
    text = text_of_length(tokenizer, ids)
    assert len(ids) - 2 <= len(tokenizer.encode(text, add_special_tokens=False)) <= len(ids)
    with pytest.raises(ConfigError, match="--text-prompts needs --tokenizer"):
        run_serve(ServeSettings(base_url=tiny_server.base_url, text_prompts=True))


def test_length_ranges_and_workload():
    assert LengthRange.parse("128") == LengthRange(128, 128)
    assert LengthRange.parse("100:1024") == LengthRange(100, 1024)
    for bad in ("0", "9:3", "x", "1:y"):
        with pytest.raises(ConfigError):
            LengthRange.parse(bad)
    ids = usable_token_ids(50, [0, 1, 2])
    requests = make_workload(20, LengthRange(3, 7), LengthRange(2, 2), ids, seed=1)
    assert all(3 <= r.input_len <= 7 and r.output_len == 2 for r in requests)
    assert all(t not in (0, 1, 2) for r in requests for t in r.prompt_token_ids)
    assert requests == make_workload(20, LengthRange(3, 7), LengthRange(2, 2), ids, seed=1)


def test_latency_reports_speculative_acceptance(tiny_llama):
    pytest.importorskip("tessellm_spec_ngram")
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
    stdout = run_cli(
        "bench", "latency", "-m", str(tiny_llama), "--input-len", "8", "--output-len", "12",
        "--num-iters", "1", "--num-iters-warmup", "0", "--json",
        "-e", f"speculative_config={spec}",
    )  # fmt: skip
    metrics = json.loads(stdout)["rows"][0]["metrics"]
    assert 0 <= metrics["spec_decode_acceptance_rate"] <= 1
    assert metrics["spec_decode_proposer_ms_per_step"] >= 0


def test_serve_counts_a_refused_request_with_the_servers_message(tiny_server):
    from tessellm.bench.serve import ServeSettings, run_serve

    settings = ServeSettings(
        base_url=tiny_server.base_url, model="no-such-model", num_prompts=2,
        input_len=LengthRange(4, 4), output_len=LengthRange(2, 2), vocab_size=200,
    )  # fmt: skip
    report = run_serve(settings)
    assert report.rows[0].metrics["completed"] == 0 and report.rows[0].metrics["failed"] == 2
    errors = {r["error"] for r in report.requests}
    assert len(errors) == 1 and errors.pop().startswith("HTTP 404: ")
