"""Hugging Face directories: config.json, tokenizer files and ``*.safetensors`` shards.

Pickle-based checkpoints (``*.bin``, ``*.pt``) are refused: loading them can run code.
Every way a directory can be broken (no ``model_type``, no tokenizer, a corrupt or cut-short
shard, a config that needs the repository's own code) ends in one ``ModelLoadError`` line
that names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tessellm.errors import ModelLoadError
from tessellm.interfaces.weights import WeightFormat

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Any one of these lets transformers build a tokenizer (fast, SentencePiece, BPE or WordPiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
# The safetensors format caps its JSON header at 100 MB; a larger length is damage.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}


def check_no_remote_code(config: Any) -> None:
    if getattr(config, "auto_map", None):
        raise ModelLoadError(
            "this model needs custom code from its repository (auto_map in config.json); "
            "tessellm never runs remote code"
        )


def read_config_json(path: Path) -> dict[str, Any]:
    """``path/config.json`` as a dict, checked before transformers sees it (whose errors
    are paragraphs, and which would offer to run remote code for an unknown type)."""
    file = path / "config.json"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(raw).__name__}, not an object")
    model_type = raw.get("model_type")
    if raw.get("auto_map"):
        raise ModelLoadError(
            f"this model needs custom code from its repository (auto_map in {file}"
            + (f", model_type {model_type!r}" if model_type else "")
            + "); tessellm never runs remote code"
        )
    if not model_type:
        raise ModelLoadError(
            f"{file} has no model_type, so the architecture is unknown; "
            'add the model_type its family uses (e.g. "llama")'
        )
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{file}: model_type {model_type!r} is unknown to transformers "
            "(a newer transformers may know it; tessellm never runs remote code)"
        )
    return raw


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_safetensors_file(file: Path) -> None:
    """Read the header of one shard and check it describes the bytes that follow.

    The safetensors library's own errors ("incomplete metadata, file not fully covered")
    do not say which file is broken or what to do; this check says both, and costs one
    header read per shard.
    """
    size = file.stat().st_size
    where = f"{file} is not a valid safetensors file"
    with file.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(f"{where}: it is {size} bytes, too short for a header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise ModelLoadError(
                f"{where}: its header claims {header_len} bytes but the file has {size} "
                "(corrupt, or not a safetensors file)"
            )
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{where}: its header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{where}: its header is not a JSON object")
    data_size = size - 8 - header_len
    end_needed = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
            bits = DTYPE_BITS.get(info["dtype"])  # a dtype newer than this table: no size check
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(
                f"{where}: tensor {name!r} has no valid dtype, shape and data_offsets"
            ) from None
        size_ok = bits is None or end - start == (numel * bits + 7) // 8
        if not 0 <= start <= end or not size_ok:
            raise ModelLoadError(
                f"{where}: tensor {name!r} has data_offsets [{start}, {end}] that do not "
                f"match its {info['dtype']} shape {info['shape']}"
            )
        end_needed = max(end_needed, end)
    if end_needed > data_size:
        raise ModelLoadError(
            f"{file} is truncated: its tensors need {end_needed} bytes of data but only "
            f"{data_size} follow the header (an interrupted download? fetch it again)"
        )


class SafetensorsFormat(WeightFormat):
    name = "safetensors"

    def accepts(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").exists()

    def load_config(self, path: Path):
        from transformers import AutoConfig

        read_config_json(path)
        # Shards are checked here too: this runs in the engine's own process, so a damaged
        # checkpoint is reported before any worker process starts to load it.
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors_file(file)
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line(exc)}") from None
        check_no_remote_code(config)
        return config

    def load_tokenizer(self, path: Path):
        from transformers import AutoTokenizer

        if not any((path / name).exists() for name in TOKENIZER_FILES):
            raise ModelLoadError(
                f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                "copy them from the model's repository or pass --tokenizer with a folder "
                "that has them"
            )
        try:
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"cannot load the tokenizer in {path}: {first_line(exc)}"
            ) from None

    def iter_weights(
        self, path: Path, config, dtype: torch.dtype
    ) -> Iterator[tuple[str, torch.Tensor]]:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ModelLoadError(
                    f"{path} holds only pickle checkpoints ({', '.join(pickles)}); tessellm "
                    "loads safetensors only, since unpickling can run arbitrary code. "
                    "Convert them to safetensors first."
                )
            raise ModelLoadError(f"no *.safetensors files in {path}")
        # All shards before the first tensor: a broken last shard fails the load at once.
        for file in files:
            check_safetensors_file(file)
        return self._read_tensors(files)

    @staticmethod
    def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        yield name, f.get_tensor(name)
            except SafetensorError as exc:  # damage the header check cannot see
                raise ModelLoadError(f"{file} is not a valid safetensors file: {exc}") from None
