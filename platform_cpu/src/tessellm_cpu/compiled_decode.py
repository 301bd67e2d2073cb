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
``<cache>/compiled/``, keyed by everything that shapes them (torch version, the tessellm
sources that were traced, the model's config and class, dtype, the input tensors' names,
shapes and dtypes, threads, the batch range); a later start loads them in about a
second. Larger batches and steps with prompt tokens run eagerly, as do models the
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
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tessellm.interfaces.attention import AttentionMetadata
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


@functools.cache
def traced_sources_digest() -> str:
    """A hash of the code a trace may run: core's layers and interfaces, and every file of
    each tessellm plugin package loaded (platforms, families, backends, quantization).
    Whole directories, so that the key is the same whichever command (and so whichever
    of their modules) loaded them. Once per process: the files do not change under it."""
    import tessellm.interfaces
    import tessellm.layers

    dirs = {Path(tessellm.layers.__file__).parent, Path(tessellm.interfaces.__file__).parent}
    for name, module in list(sys.modules.items()):
        if name.startswith("tessellm_") and "." not in name and getattr(module, "__file__", None):
            dirs.add(Path(module.__file__).parent)
    h = hashlib.sha256()
    for path in sorted(f for d in dirs for f in d.rglob("*.py")):
        h.update(str(path).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


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
            "torch": torch.__version__,
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
        h.update(traced_sources_digest().encode())
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
