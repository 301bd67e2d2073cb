"""Broken model folders and files end in one clear line: ``ModelLoadError`` from ``LLM``,
``Error: ...`` and a non-zero exit from the CLI, never a traceback."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_cli import run_cli
from typer.testing import CliRunner

from tessellm import LLM
from tessellm.cli.app import build_app
from tessellm.errors import ModelLoadError


def shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def drop_tokenizer(folder: Path) -> None:
    for file in folder.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added")):
            file.unlink()


def header_of(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_shard(file: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def absurd_header_length(folder: Path) -> None:
    file = shard(folder)
    data = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])


def invalid_header_json(folder: Path) -> None:
    file = shard(folder)
    data = bytearray(file.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + length] = b"{" * length
    file.write_bytes(bytes(data))


def bad_offsets(folder: Path) -> None:
    file = shard(folder)
    header, body = header_of(file)
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    write_shard(file, header, body)


def truncated_data(folder: Path) -> None:
    file = shard(folder)
    data = file.read_bytes()
    file.write_bytes(data[:-1000])


def auto_map_unknown_type(folder: Path) -> None:
    edit_config(
        folder,
        model_type="evil_unknown_type",
        auto_map={"AutoConfig": "configuration_evil.EvilConfig"},
    )


# (case, how to break the folder, what the one line says)
def fp8_weight_in_a_dense_model(folder: Path) -> None:
    """An fp8 weight where no quantization method expects one: cast, it would load without
    its scale (as an fp8 MoE expert would)."""
    from safetensors.torch import load_file, save_file

    file = shard(folder)
    tensors = load_file(file)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, file)


def unknown_quant_method(folder: Path) -> None:
    edit_config(folder, quantization_config={"quant_method": "mystery-q", "bits": 3})


BROKEN_FOLDERS: list[tuple[str, Callable[[Path], None], str]] = [
    ("no-model-type", lambda d: edit_config(d, model_type=None), r"config\.json has no model_type"),
    ("unknown-model-type", lambda d: edit_config(d, model_type="zzz_nope"), "unknown to transform"),
    (
        "config-not-json",
        lambda d: (d / "config.json").write_text("{not json"),
        r"config\.json is not valid JSON",
    ),
    ("no-tokenizer", drop_tokenizer, "has no tokenizer files"),
    ("absurd-header-length", absurd_header_length, "header claims 1152921504606846976 bytes"),
    ("invalid-header-json", invalid_header_json, "header is not valid JSON"),
    ("bad-offsets", bad_offsets, r"data_offsets \[\d+, \d+\] that do not match"),
    ("truncated-data", truncated_data, r"is truncated: its tensors need \d+ bytes"),
    ("auto-map-unknown-type", auto_map_unknown_type, "model_type 'evil_unknown_type'.*remote"),
    ("fp8-without-its-method", fp8_weight_in_a_dense_model, "holds float8_e4m3fn weights, but"),
    (
        "unknown-quant-method",
        unknown_quant_method,
        "quantized with 'mystery-q', which no installed",
    ),
]


@pytest.fixture
def break_folder(tiny_llama, tmp_path) -> Callable[[str, Callable[[Path], None]], Path]:
    def make(case: str, mutate: Callable[[Path], None]) -> Path:
        folder = tmp_path / case
        shutil.copytree(tiny_llama, folder)
        mutate(folder)
        return folder

    return make


@pytest.mark.parametrize(
    ("case", "mutate", "message"), BROKEN_FOLDERS, ids=[c[0] for c in BROKEN_FOLDERS]
)
def test_broken_folder_is_one_clear_error(break_folder, case, mutate, message):
    folder = break_folder(case, mutate)
    with pytest.raises(ModelLoadError, match=message) as info:
        LLM(model=str(folder), dtype="float32", device="cpu")
    assert "\n" not in str(info.value)
    # The CLI command as a user types it (in-process here; one real process below).
    result = CliRunner().invoke(build_app(), ["generate", "--model", str(folder), "x"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert str(info.value) in lines[0]
    assert isinstance(result.exception, SystemExit)


def test_cli_process_prints_one_line_for_a_broken_folder(break_folder):
    folder = break_folder("truncated", truncated_data)
    proc = run_cli("generate", "--model", str(folder), "x", timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "is truncated" in errors[0], proc.stderr


def tiny_gguf(path: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((8,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_truncated_gguf_says_the_tensor_data_is_cut(tmp_path, tessellm_cache_dir):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    whole = path.read_bytes()
    path.write_bytes(whole[:-200])
    with pytest.raises(ModelLoadError, match="tensor data is truncated") as info:
        LLM(model=str(path), dtype="float32", device="cpu")
    message = str(info.value)
    assert f"the file has {len(whole) - 200} (200 missing" in message
    assert "reshape" not in message and "\n" not in message


def test_gguf_cut_inside_its_metadata_says_so(tmp_path, tessellm_cache_dir):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ModelLoadError, match="metadata cannot be parsed") as info:
        LLM(model=str(path), dtype="float32", device="cpu")
    assert "\n" not in str(info.value)
