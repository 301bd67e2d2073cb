"""Write a real GPTQ, AWQ or fp8 checkpoint of random weights for a model shape.

Why: GPU benchmarks of the quantized paths need a quantized checkpoint of a real model
shape (e.g. ``random:llama-3-8b``), and no model hub is reachable where they run. The
``random:`` source makes dense random weights in memory only; this script writes what
AutoGPTQ, AutoAWQ or vLLM's fp8 export would have written: safetensors shards in HF
naming (``model.layers.0.self_attn.q_proj.qweight`` ...), an index, ``config.json`` with
the format's ``quantization_config``, and the source's tokenizer files. The packed tensors
come from the tessellm method's own reference quantizer (``checkpoint_tensors``), so the
checkpoint is one the engine loads exactly as it would a downloaded one.

    python bench/quantized_checkpoint.py --model random:llama-3-8b --method gptq \\
        --out /tmp/llama8b-gptq [--group-size 128] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tessellm.interfaces.quantization import QuantizationMethod
from tessellm.model_loader import resolve_model
from tessellm.plugins import get_plugins
from tessellm.selection import checkpoint_quantization, methods_reading
from tessellm.sources.random_weights import DEFAULT_STD, MARKER_FILE

# Each format's quantization_config as its usual writer stores it, by group size.
QUANT_CONFIGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "gptq": lambda group: {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group,
        "desc_act": False,
        "sym": True,
        "checkpoint_format": "gptq",
    },
    "awq": lambda group: {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": "gemm",
    },
    "fp8": lambda _: {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "ignored_layers": ["lm_head"],
    },
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SKIPPED_FILES = {"config.json", MARKER_FILE, "model.safetensors.index.json"}
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="e.g. random:llama-3-8b or a local dir")
    parser.add_argument("--method", required=True, choices=sorted(QUANT_CONFIGS))
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory")
    parser.add_argument("--group-size", type=int, default=128, help="gptq/awq input group")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser.parse_args(argv)


def resolve_source(model: str, cache_dir: Path) -> Path:
    """The model's HF directory (config.json + tokenizer), via tessellm's model sources."""
    path = resolve_model(get_plugins(), model, cache_dir).path
    if not (path / "config.json").is_file():
        raise SystemExit(f"{model!r} resolved to {path}, which is not an HF model directory")
    return path


def build_method(config_path: Path, name: str) -> QuantizationMethod:
    """The method as the engine builds it from the written ``config.json``: the format is
    read by ``name`` and ``from_config`` takes the config (raises where it refuses it)."""
    from transformers import AutoConfig

    qc = checkpoint_quantization(AutoConfig.from_pretrained(config_path.parent))
    if qc is None:
        raise SystemExit(f"{config_path} has no quantization_config")
    plugins = get_plugins()
    readers = methods_reading(plugins, str(qc["quant_method"]))
    if name not in readers:
        raise SystemExit(
            f"method {name!r} does not read {qc['quant_method']!r} (readers: {readers})"
        )
    return plugins.load("quantization_methods", name).from_config(qc)


def write_config(source: Path, staging: Path, method: str, group: int, dtype: str) -> Path:
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIGS[method](group)
    for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
        config[key] = dtype
    path = staging / "config.json"
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def copy_other_files(source: Path, staging: Path) -> None:
    """Tokenizer and any other non-weight files; not the random-weights marker, so the
    directory loads as a plain safetensors checkpoint."""
    for item in source.iterdir():
        if item.name in SKIPPED_FILES or item.name.endswith(WEIGHT_SUFFIXES):
            continue
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)


def meta_model(source: Path) -> tuple[Any, nn.Module]:
    """The HF model on the meta device: parameter names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config, model


class ShardWriter:
    """Collects tensors into shards of at most ``max_bytes``, each saved on a background
    thread while the next one is generated; at most one shard waits to be written."""

    def __init__(self, staging: Path, max_bytes: int) -> None:
        self.staging = staging
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.writing: Future[None] | None = None

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending.update(tensors)
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        from safetensors.torch import save_file

        if self.writing is not None:
            self.writing.result()
        path = self.staging / f"shard-{len(self.files):05d}.safetensors"
        self.files.append((path, list(self.pending)))
        self.total_bytes += self.pending_bytes
        shard, gb = self.pending, self.pending_bytes / GB
        self.writing = self.pool.submit(save_file, shard, str(path), {"format": "pt"})
        print(f"  shard {len(self.files)}: {len(shard)} tensors, {gb:.2f} GB", flush=True)
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        """Write the last shard, name the shards ``model-0000i-of-0000n`` and the index."""
        self.flush()
        if self.writing is not None:
            self.writing.result()
        self.pool.shutdown()
        weight_map: dict[str, str] = {}
        count = len(self.files)
        for i, (path, names) in enumerate(self.files, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.staging / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@torch.no_grad()
def module_tensors(
    prefix: str,
    module: nn.Module,
    method: QuantizationMethod,
    seen: set[int],
    gen: torch.Generator,
    dtype: torch.dtype,
    std: float,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of ``module``'s own parameters, on the CPU: a linear's
    weight as the method stores it (not the LM head, which stays dense), matrices
    N(0, std), vectors ones (norm scales) or zeros (biases)."""
    device = gen.device
    quantize = isinstance(module, nn.Linear) and not prefix.endswith("lm_head")
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(recurse=False):
        if id(param) in seen:  # tied to an earlier parameter (embeddings): stored once
            continue
        seen.add(id(param))
        full = f"{prefix}.{name}" if prefix else name
        if param.dim() >= 2:
            value = torch.empty(param.shape, device=device, dtype=dtype).normal_(
                0, std, generator=gen
            )
        elif name == "bias":
            value = torch.zeros(param.shape, device=device, dtype=dtype)
        else:
            value = torch.ones(param.shape, device=device, dtype=dtype)
        if quantize and name == "weight":
            # The reference quantizers make some tensors without a device; build them here.
            with torch.device(device):
                packed = method.checkpoint_tensors(value)
            out.update({f"{prefix}.{key}": t for key, t in packed.items()})
        else:
            out[full] = value
    return {name: t.to("cpu").contiguous() for name, t in out.items()}


def write_checkpoint(args: argparse.Namespace, source: Path) -> tuple[int, int]:
    """Write the checkpoint into a staging directory next to ``--out``, then move it
    there; returns (bytes of tensors, shards)."""
    out: Path = args.out
    if out.exists():
        if not args.force:
            raise SystemExit(f"{out} exists (pass --force to replace it)")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config_path = write_config(source, staging, args.method, args.group_size, args.dtype)
        method = build_method(config_path, args.method)
        if getattr(method, "group_size", args.group_size) != args.group_size:
            raise SystemExit(f"the written config reads back as group {method.group_size}")
        copy_other_files(source, staging)
        config, model = meta_model(source)
        std = float(getattr(config, "initializer_range", None) or DEFAULT_STD)
        layers = int(getattr(config.get_text_config(), "num_hidden_layers", 0))
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        dtype = getattr(torch, args.dtype)
        writer = ShardWriter(staging, int(args.max_shard_gb * GB))
        seen: set[int] = set()
        start, last_layer = time.perf_counter(), -1
        for prefix, module in model.named_modules():
            tensors = module_tensors(prefix, module, method, seen, gen, dtype, std)
            if tensors:
                writer.add(tensors)
            match = LAYER_INDEX.search(prefix + ".")
            if match and int(match.group(1)) != last_layer:
                last_layer = int(match.group(1))
                if last_layer % 8 == 0:
                    took = time.perf_counter() - start
                    print(f"  layer {last_layer}/{layers} ({took:.1f} s)", flush=True)
        writer.finish()
        _readable_by_all(staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return writer.total_bytes, len(writer.files)


def _readable_by_all(directory: Path) -> None:
    """The modes a plain mkdir and open would give (mkdtemp and the writer use 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        if file.is_file():
            file.chmod(0o666 & ~umask)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    start = time.perf_counter()
    env_cache = os.environ.get("TESSELLM_CACHE")
    with tempfile.TemporaryDirectory(prefix="tessellm-source-") as tmp:
        source = resolve_source(args.model, Path(env_cache) if env_cache else Path(tmp))
        print(f"{args.model} -> {source}; writing {args.method} to {args.out}", flush=True)
        total, shards = write_checkpoint(args, source)
    took = time.perf_counter() - start
    print(
        f"wrote {args.out}: {total / GB:.2f} GB in {shards} shard(s), {took:.1f} s "
        f"({total / GB / took:.2f} GB/s)",
        flush=True,
    )
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
