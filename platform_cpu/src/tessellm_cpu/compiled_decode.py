"""Compiled decode steps on the CPU: the model's decode forward, exported once with
``torch.export`` and compiled ahead of time by AOTInductor into a shared library.

At batch 1 a small model's eager decode step spends more time dispatching ~2,300 small
torch ops from Python than in its matmuls. ``torch.compile`` fuses the glue, but its
runtime (guards, input collection, the Python wrapper calling each kernel) still costs
3-4 ms a step here. An AOTInductor library runs the whole step from C++ in one call: the
norms, rotary, residuals and the attention's gather/mask/softmax become a few fused
loops, the int4 matmuls are called directly.

The compiled step (:class:`DecodeStep`) takes ``B`` one-token sequences and a block
table ``W`` columns wide, both dynamic: one library serves every decode batch of 1-16
sequences (int4 linears) and every context length, another 17-64 (dense linears).
Weights and KV caches are inputs, not constants: the library holds only code, shares the
model's tensors, and does not depend on the weights' values. Libraries are cached under
``<cache>/compiled/``, keyed by everything that shapes them (torch and transformers
versions, the sources of every package whose code the trace may run, whatever it is
called: see :func:`traced_module_names`; the model's config and class, dtype, the input
tensors' names, shapes and dtypes, threads, the batch range); a later start loads them in
about a second. Larger batches and steps with prompt tokens run eagerly, as do models the
exporter cannot trace (a step whose Python branches on tensor values, such as MoE
routing): the runner logs why and returns None.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import types
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils import _pytree as pytree

import tessellm
from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.ops import FusedOps
from tessellm.interfaces.platform import GraphSpec
from tessellm.layers.attention import Attention

logger = logging.getLogger(__name__)

# Decode batch sizes with a library each. Up to 16 sequences the linears take the int4
# kernels (woq.PACKED_MAX_ROWS), beyond it the dense ones: a trace follows one branch, so
# the ranges split there. Past 64 the dense matmuls are most of a step (the eager step's
# Python overhead is a few percent) and larger batches run eagerly. A range is built only
# where max_num_seqs reaches it (`generate`, one sequence, builds only the first).
BATCH_RANGES = ((1, 16), (17, 64))
ENABLE_ENV = "TESSELLM_CPU_COMPILE"  # "0": never compile (tests; the eager reference)
CACHE_FORMAT = 1


def compile_enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


def compiler_missing() -> str | None:
    """Why AOTInductor cannot build here (it needs a C++ compiler), or None."""
    if any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++) on PATH"


class DecodeStep(nn.Module):
    """The model's forward for a decode batch, with weights and KV caches as inputs."""

    def __init__(self, model: nn.Module, attn_layers: list[Attention]) -> None:
        super().__init__()
        self.model = model
        self._attn_layers = attn_layers

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_caches: list[torch.Tensor],
        weights: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        for i, layer in enumerate(self._attn_layers):
            layer.bind_kv_cache(kv_caches[2 * i], kv_caches[2 * i + 1])
        # One query token per sequence. The host-side fields are not read under tracing
        # (a traced backend uses tensors only); they get the device tensors.
        query_start_loc = torch.arange(
            input_ids.shape[0] + 1, dtype=torch.int32, device=input_ids.device
        )
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            slot_mapping=slot_mapping,
            max_query_len=1,
            max_seq_len=0,
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        return torch.func.functional_call(self.model, weights, (input_ids, positions, metadata))


# Packages whose versions are in the key instead of their sources (and the standard
# library, which comes with the Python version).
VERSIONED_PACKAGES = {"torch": torch.__version__, "transformers": transformers.__version__}


# Attribute values that hold no code of their own (submodules are walked as modules).
_NOT_CODE = (torch.Tensor, nn.Module, dict, list, tuple, set, str, bytes, int, float, bool)


def _defining_modules(obj: object) -> set[str]:
    """Modules whose code ``obj`` runs: those defining its class and the class's bases, or
    the module of a function (a fused-op entry); a fused-op table's entries each."""
    if isinstance(obj, FusedOps):
        entries = (getattr(obj, name) for name in obj.names())
        return {type(obj).__module__} | {getattr(f, "__module__", None) or "" for f in entries}
    if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
        func = obj.func if isinstance(obj, functools.partial) else obj
        return {getattr(func, "__module__", None) or ""}
    return {cls.__module__ for cls in type(obj).__mro__}


def traced_module_names(model: nn.Module) -> set[str]:
    """Every module the traced step may run code of: those defining the model's modules'
    classes (their bases included) and the objects they hold (attention backend,
    quantization method, fused-op table) and those objects' own, whatever their package
    is called."""
    names = {__name__, "tessellm.layers", "tessellm.interfaces"}
    seen: set[int] = set()

    def held(owner: object, depth: int) -> None:
        for value in getattr(owner, "__dict__", {}).values():
            if isinstance(value, _NOT_CODE) or id(value) in seen:
                continue
            seen.add(id(value))
            names.update(_defining_modules(value))
            if depth:
                held(value, depth - 1)

    for module in model.modules():
        names |= _defining_modules(module)
        held(module, 1)
    return {n for n in names if n}


def _source_roots(name: str) -> set[Path]:
    """What to hash for module ``name``: its whole top-level package (directories), so
    that the key does not depend on which of its modules a command happened to import;
    core by the sub-package holding the module (its layers and interfaces, not its CLI or
    server). Nothing for torch, transformers and the standard library."""
    top = name.partition(".")[0]
    if top in VERSIONED_PACKAGES or top in sys.stdlib_module_names or top == "builtins":
        return set()
    if top == "tessellm":
        file = getattr(sys.modules.get(name), "__file__", None)
        if file is None:
            return set()
        path, core = Path(file), Path(tessellm.__file__).parent
        return {path.parent if path.parent != core else path}
    module = sys.modules.get(top)
    paths = getattr(module, "__path__", None)
    if paths is not None:
        return {Path(p) for p in paths}
    file = getattr(module, "__file__", None)
    return {Path(file)} if file else set()


def _digest(roots: set[Path]) -> str:
    h = hashlib.sha256()
    for root in sorted(roots):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            # Relative names: the same sources in another checkout give the same key.
            h.update(str(path.relative_to(root.parent)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def traced_sources_digest(model: nn.Module) -> str:
    """A hash of the code a trace of ``model`` may run (:func:`traced_module_names`), by
    whole package directories (the runner takes it once, when it is made)."""
    roots = {root for name in traced_module_names(model) for root in _source_roots(name)}
    return _digest(roots)


class CompiledDecodeRunner:
    """A :class:`~tessellm.interfaces.platform.GraphRunner` over an AOTInductor library."""

    def __init__(self, model: nn.Module, spec: GraphSpec, cache_dir: Path) -> None:
        self.model = model
        # Whole ranges whatever max_num_seqs is within them: `generate` (one sequence) and
        # a server share the first range's library (one cache entry).
        self.batch_ranges = [r for r in BATCH_RANGES if r[0] <= spec.max_num_seqs]
        self.world_size = spec.world_size
        self.cache_dir = cache_dir
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.weights = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self._sources_digest = traced_sources_digest(model)
        self._libraries: list[tuple[int, int, Any]] = []  # (fewest, most sequences, library)
        self._static: list[torch.Tensor] = []
        self.failure: str | None = None
        self.steps = 0  # decode steps run compiled

    # -- building ----------------------------------------------------------------------
    def _kv_caches(self) -> list[torch.Tensor]:
        return [t for layer in self.attn_layers for t in (layer.k_cache, layer.v_cache)]

    def cache_key(self, batch_range: tuple[int, int]) -> str:
        h = hashlib.sha256()
        config = getattr(self.model, "config", None)
        facts = {
            "format": CACHE_FORMAT,
            "versions": VERSIONED_PACKAGES,
            "model": type(self.model).__qualname__,
            "config": config.to_json_string() if hasattr(config, "to_json_string") else "",
            "batch_range": list(batch_range),
            "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            # The caches' block count is a dynamic dimension (it follows free memory).
            "kv_caches": [(list(c.shape[1:]), str(c.dtype)) for c in self._kv_caches()],
            "weights": [
                (name, list(t.shape), str(t.dtype), list(t.stride()))
                for name, t in self.weights.items()
            ],
        }
        h.update(json.dumps(facts, sort_keys=True).encode())
        h.update(self._sources_digest.encode())
        return h.hexdigest()[:32]

    def _example_args(self, batch_range: tuple[int, int]) -> tuple[Any, ...]:
        # Distinct example sizes (sequences, 3 blocks): equal ones could be unified.
        batch, width = batch_range[0] + 1, 3
        return (
            torch.zeros(batch, dtype=torch.int64),
            torch.arange(batch, dtype=torch.int64),
            torch.arange(batch, dtype=torch.int64),
            torch.zeros(batch, width, dtype=torch.int32),
            torch.ones(batch, dtype=torch.int32),
            self._kv_caches(),
            self.weights,
        )

    def _export(self, batch_range: tuple[int, int]) -> torch.export.ExportedProgram:
        args = self._example_args(batch_range)
        seqs = torch.export.Dim("num_seqs", min=batch_range[0], max=batch_range[1])
        width = torch.export.Dim("table_width", min=1, max=1 << 20)
        blocks = torch.export.Dim("num_blocks", min=2, max=1 << 30)
        dynamic = (
            {0: seqs},
            {0: seqs},
            {0: seqs},
            {0: seqs, 1: width},
            {0: seqs},
            [{0: blocks}] * len(args[5]),
            dict.fromkeys(self.weights),
        )
        # Trace the plain torch code: a fused-op table may branch on tensor values.
        fused = [(m, m.fused_ops) for m in self.model.modules() if hasattr(m, "fused_ops")]
        caches = [(layer, layer.k_cache, layer.v_cache) for layer in self.attn_layers]
        try:
            for module, _ in fused:
                module.fused_ops = None
            with warnings.catch_warnings():
                # The KV cache attributes are rebound during the trace on purpose.
                warnings.filterwarnings("ignore", message=".*were assigned during export.*")
                return torch.export.export(
                    DecodeStep(self.model, self.attn_layers),
                    args,
                    dynamic_shapes=dynamic,
                    strict=False,
                )
        finally:
            for module, ops in fused:
                module.fused_ops = ops
            for layer, k, v in caches:
                layer.bind_kv_cache(k, v)

    def _build(self, path: Path, batch_range: tuple[int, int]) -> None:
        with torch.no_grad():
            program = self._export(batch_range)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
        # The trace assumes dynamic sizes of at least 2 (sizes 0 and 1 would specialise),
        # yet one sequence or one block runs the same code: the library's optional input
        # checks (AOTI_RUNTIME_CHECK_INPUTS=1) must not reject them.
        options = {}
        if hasattr(torch._inductor.config.aot_inductor, "check_lowerbound"):
            options["aot_inductor.check_lowerbound"] = False
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(partial), inductor_configs=options
        )
        os.replace(partial, path)

    def capture(self) -> None:
        if not compile_enabled():
            self.failure = f"{ENABLE_ENV}=0"
            return
        # The gloo collectives of a tensor-parallel forward are not exported.
        tensor_parallel = (
            f"tensor parallel ({self.world_size} ranks)" if self.world_size > 1 else None
        )
        self.failure = tensor_parallel or compiler_missing()
        if self.failure:
            logger.warning("CPU decode steps run eagerly: %s", self.failure)
            return
        start = time.monotonic()
        try:
            for batch_range in self.batch_ranges:
                path = self.cache_dir / "compiled" / f"decode-{self.cache_key(batch_range)}.pt2"
                if not path.exists():
                    logger.warning(
                        "compiling the CPU decode step for %d-%d sequences (once for this "
                        "model and tessellm; 1-2 minutes for a 135M model on two cores) "
                        "into %s",
                        *batch_range,
                        path.parent,
                    )
                    self._build(path, batch_range)
                library = torch._inductor.aoti_load_package(str(path), run_single_threaded=True)
                self._libraries.append((*batch_range, library))
        except Exception as exc:  # any failure leaves eager decode working
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            logger.warning("CPU decode steps run eagerly (compiling failed): %s", self.failure)
            self._libraries.clear()
            return
        self._static = pytree.tree_leaves((self._kv_caches(), self.weights))
        logger.info("CPU decode steps ready in %.1f s", time.monotonic() - start)

    # -- running -----------------------------------------------------------------------
    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor | None:
        n = input_ids.shape[0]
        if metadata.max_query_len != 1 or n != metadata.num_seqs:
            return None
        for fewest, most, library in self._libraries:
            if fewest <= n <= most:
                inputs = [
                    input_ids,
                    positions,
                    metadata.slot_mapping,
                    metadata.block_tables,
                    metadata.seq_lens,
                    *self._static,
                ]
                self.steps += 1
                return library.loader.boxed_run(inputs)[0]
        return None
