"""Keeps what a GGUF file converts into (config, tokenizer, dequantized weights) on disk.

Reading GGUF metadata parses the whole vocabulary through numpy memmaps (seconds each
time), converting the tokenizer takes seconds more, and dequantizing takes longer still;
the results never change for a given file. The first load writes them, in Hugging Face
form, under ``<tessellm cache>/converted/<file stem>-<key>/``; later loads read them back
(JSON and safetensors only: nothing executable). The key covers the file's absolute path,
size and modification time, and the transformers version that did the conversion, so an
edited file or a different converter starts afresh. ``TESSELLM_GGUF_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

CACHE_VERSION = 1
DISABLE_ENV = "TESSELLM_GGUF_CACHE"
# Dequantized weights beyond this are not cached: the copy would double peak memory while
# loading and fill the disk, and a model that large spends its start-up elsewhere anyway.
MAX_CACHED_WEIGHT_BYTES = 2 << 30


def cache_dir_for(path: Path) -> Path | None:
    """Where ``path``'s conversions live, or None when caching is off."""
    if os.environ.get(DISABLE_ENV, "1").strip() in ("0", "false", "no", "off"):
        return None
    from tessellm.config import default_cache_dir

    stat = path.stat()
    try:
        converter = md.version("transformers")
    except md.PackageNotFoundError:
        converter = "?"
    ident = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter}|{CACHE_VERSION}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return default_cache_dir() / "converted" / f"{path.stem}-{key}"


def _publish_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write into a private folder, then rename it into place (another process may race)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # someone else published first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass  # a read-only or full cache only costs the next start-up its speed


def _cached_pretrained(
    path: Path, name: str, marker: str, auto_class: str, convert: Callable[[], Any]
) -> Any:
    """A transformers object (``save_pretrained``/``from_pretrained``) converted from the
    GGUF at ``path``: loaded from the cache's ``name`` folder when its ``marker`` file is
    there, else converted and published for the next start-up."""
    folder = cache_dir_for(path)
    target = folder / name if folder else None
    if target is not None and (target / marker).is_file():
        import transformers

        loader = getattr(transformers, auto_class)
        return loader.from_pretrained(str(target), trust_remote_code=False)
    converted = convert()
    if target is not None:
        _publish_dir(target, lambda tmp: converted.save_pretrained(str(tmp)))
    return converted


def cached_config(path: Path, convert: Callable[[], Any]) -> Any:
    return _cached_pretrained(path, "config", "config.json", "AutoConfig", convert)


def cached_tokenizer(path: Path, convert: Callable[[], Any]) -> Any:
    return _cached_pretrained(path, "tokenizer", "tokenizer_config.json", "AutoTokenizer", convert)


def cached_weights(
    path: Path, dtype: torch.dtype, convert: Callable[[], Iterator[tuple[str, torch.Tensor]]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The converted tensors; matrices stored in ``dtype`` (the model casts them to it
    anyway), vectors (norms, biases) kept as converted, since a model may hold them wider."""
    folder = cache_dir_for(path)
    file = folder / f"weights-{str(dtype).removeprefix('torch.')}.safetensors" if folder else None
    if file is not None and file.is_file():
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)
        return
    kept: dict[str, torch.Tensor] | None = {} if file is not None else None
    size = 0
    for name, tensor in convert():
        if tensor.is_floating_point() and tensor.dim() >= 2:
            tensor = tensor.to(dtype)
        if kept is not None:
            size += tensor.numel() * tensor.element_size()
            kept = None if size > MAX_CACHED_WEIGHT_BYTES else kept
        if kept is not None:
            kept[name] = tensor.contiguous()
        yield name, tensor
    if kept and file is not None:
        _write_weights(file, kept)


def _write_weights(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=file.parent)
        os.close(fd)
        save_file(tensors, tmp)
        os.replace(tmp, file)
    except (OSError, RuntimeError, ValueError):  # full disk, shared tensors: skip caching
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
