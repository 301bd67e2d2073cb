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
model's tensors, and does not depend on the weights' values. Windowed layers in KV groups
of their own read their group's table (:mod:`tessellm_cpu.decode_groups`). Libraries are
cached under ``<cache>/compiled/`` (:mod:`tessellm_cpu.cache_store`, bounded, least
recently used first out), keyed by everything that shapes them (:mod:`tessellm_cpu.decode_key`).

A cached library loads in milliseconds when the runner is captured. A missing one is
built in a child process (:mod:`tessellm_cpu.background_build`) while the engine serves
eagerly; each batch range switches to its library between two steps once it is built.
Larger batches and steps with prompt tokens run eagerly, as do models the exporter cannot
trace (a step whose Python branches on tensor values, such as MoE routing): the runner
logs why and returns None.

With speculative decoding on (``GraphSpec.max_draft_tokens = k``), verification steps
(``1 + d`` tokens per sequence, ``d <= k``) get libraries of their own, traced for
``Q = 1 + k`` query tokens per sequence, over which each step is padded
(:mod:`tessellm_cpu.verify_step`); ``TESSELLM_CPU_COMPILE_VERIFY=0`` leaves them eager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from tessellm.interfaces.attention import AttentionMetadata
from tessellm.interfaces.platform import GraphSpec
from tessellm_cpu import cache_store
from tessellm_cpu.compile_plan import (  # noqa: F401 - compiler_missing etc. re-exported
    ENABLE_ENV,
    Shape,
    compile_enabled,
    compile_mode,
    compiler_missing,
    describe_pending,
    describe_shape,
    library_shape,
    query_len_of,
    range_label,
)
from tessellm_cpu.decode_groups import layout_facts, num_kv_groups, step_inputs, write_check
from tessellm_cpu.decode_key import (  # noqa: F401 - re-exported
    VERSIONED_PACKAGES,
    library_key,
    traced_module_names,
    traced_sources_digest,
)
from tessellm_cpu.decode_step import DecodeStep, decode_inputs, load_library  # noqa: F401
from tessellm_cpu.verify_step import VERIFY_ENV, VerificationSteps

logger = logging.getLogger(__name__)

# Decode batch sizes with a library each. Up to 16 sequences the woq linears take the
# int4 kernels (tessellm_quant_int4.cpu_int4.packed_max_rows), beyond it, on AVX-512, the
# dense ones: a trace follows one branch, so the ranges split there. Past 64 the dense
# matmuls are most of a step (the eager step's Python overhead is a few percent) and
# larger batches run eagerly. A range is built only where max_num_seqs reaches it
# (`generate`, one sequence, builds only the first).
BATCH_RANGES = ((1, 16), (17, 64))


class CompiledDecodeRunner:
    """A :class:`~tessellm.interfaces.platform.GraphRunner` over AOTInductor libraries,
    built in the background where the cache lacks them."""

    def __init__(self, model: nn.Module, spec: GraphSpec, cache_dir: Path) -> None:
        self.model = model
        # Whole ranges whatever max_num_seqs is within them: `generate` (one sequence) and
        # a server share the first range's library (one cache entry).
        self.batch_ranges = [r for r in BATCH_RANGES if r[0] <= spec.max_num_seqs]
        # Speculative verification steps: Q = 1 + k tokens per sequence.
        self.verify = VerificationSteps(model, spec, self.batch_ranges)
        self.attn_layers, _, self.weights = decode_inputs(model)
        # Windowed layers in KV groups of their own: a block table per group (decode_groups).
        self.num_groups = num_kv_groups(self.attn_layers)
        # Every library this runner uses: the decode ones first (every step takes them).
        self.shapes: list[Shape] = [
            *self.batch_ranges,
            *(library_shape(r, self.verify.query_len) for r in self.verify.ranges),
        ]
        self.world_size = spec.world_size
        self.cache_dir = cache_dir
        config = getattr(model, "config", None)
        self.model_name = spec.model or getattr(config, "_name_or_path", "") or type(model).__name__
        self._sources_digest = traced_sources_digest(model)
        self._libraries: list[tuple[int, int, Any]] = []  # (fewest, most sequences, library)
        self._static: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self._arrived: list[tuple[Shape, Path]] = []  # built, not yet loaded
        self.pending: list[Shape] = []  # libraries building in the background
        self._build: Any = None  # background_build.BuildProcess
        self._build_start = 0.0
        self._paths: dict[Shape, Path] = {}
        self.failure: str | None = None
        self.steps = 0  # decode steps run compiled
        self.threads = torch.get_num_threads()  # one fewer while a build runs (yield_core)

    @property
    def verify_steps(self) -> int:
        """Verification steps run compiled."""
        return self.verify.steps

    def _kv_caches(self) -> list[torch.Tensor]:
        return [t for layer in self.attn_layers for t in (layer.k_cache, layer.v_cache)]

    def cache_key(self, shape: Shape) -> str:
        return library_key(
            self.model,
            self.weights,
            self._kv_caches(),
            shape[:2],
            self._sources_digest,
            query_len_of(shape),
            kv_layout=layout_facts(self.attn_layers),
        )

    def library_path(self, shape: Shape) -> Path:
        if shape not in self._paths:  # the key hashes every weight's layout: once
            key = self.cache_key(shape)
            self._paths[shape] = cache_store.compiled_dir(self.cache_dir) / f"decode-{key}.pt2"
        return self._paths[shape]

    @property
    def ready_ranges(self) -> list[Shape]:
        """Libraries loaded or built (loaded at the next call), by shape: decode batch
        ranges, then ``(fewest, most, Q)`` of verification libraries."""
        with self._lock:
            arrived = [shape for shape, _ in self._arrived]
        loaded = [(lo, hi) for lo, hi, _ in self._libraries]
        loaded += [(lo, hi, self.verify.query_len) for lo, hi, _ in self.verify.libraries]
        return sorted(loaded + arrived, key=lambda shape: (query_len_of(shape), shape))

    # -- starting ----------------------------------------------------------------------
    def capture(self) -> None:
        mode = compile_mode()
        if mode == "off":
            self.failure = f"{ENABLE_ENV}=0"
            self.verify.log_eager(self.failure)
            return
        # The gloo collectives of a tensor-parallel forward are not exported.
        tensor_parallel = (
            f"tensor parallel ({self.world_size} ranks)" if self.world_size > 1 else None
        )
        self.failure = tensor_parallel or compiler_missing()
        if self.failure:
            logger.warning("CPU decode steps run eagerly: %s", self.failure)
            return
        if not self.verify.query_len:
            self.verify.log_eager(f"{VERIFY_ENV}=0")
        self._static = pytree.tree_leaves((self._kv_caches(), self.weights))
        missing = []
        for shape in self.shapes:
            path = self.library_path(shape)
            try:
                self._add_library(shape, load_library(path))
            except Exception as exc:  # absent, or unreadable: (re)build it
                if path.exists():
                    logger.warning("rebuilding the unreadable library %s: %s", path, exc)
                    with contextlib.suppress(OSError):
                        path.unlink()
                missing.append((shape, path))
        if missing:
            self._start_build(missing, mode)
        if mode == "wait":
            self.wait_ready()

    def _add_library(self, shape: Shape, library: Any) -> None:
        """Into the list its step kind reads (replaced whole: a step may be reading it).
        A library over several KV groups is checked first (decode_groups.write_check)."""
        if self.num_groups > 1:
            config = getattr(self.model, "config", None)
            token = getattr(config, "bos_token_id", None) or 1  # not padding: a zero embedding
            wrong = write_check(library, self.attn_layers, self.weights, query_len_of(shape), token)
            if wrong:
                self.failure = self.failure or wrong
                logger.warning("the CPU %s runs eagerly: %s", describe_shape(shape), wrong)
                return
        if query_len_of(shape) > 1:
            self.verify.add(shape[0], shape[1], library)
        else:
            entry = (shape[0], shape[1], library)
            self._libraries = sorted([*self._libraries, entry], key=lambda e: e[0])

    def _start_build(self, missing: list[tuple[Shape, Path]], mode: str) -> None:
        from tessellm_cpu import background_build

        try:
            limit = cache_store.max_bytes()
        except ValueError as exc:
            limit = cache_store.DEFAULT_MAX_BYTES
            logger.warning("%s; the cache keeps at most %d bytes", exc, limit)
        directory = cache_store.compiled_dir(self.cache_dir)
        try:
            blob = background_build.serialize_model(self.model, self._kv_caches())
        except Exception as exc:  # e.g. a module holding an object pickle cannot take
            self.failure = f"cannot send the model to a build process: {type(exc).__name__}: {exc}"
            logger.warning("CPU decode steps run eagerly: %s", self.failure)
            return
        payload = {
            "model": blob,
            "model_name": self.model_name,
            "modules": sorted(traced_module_names(self.model)),
            "sys_path": list(sys.path),
            "threads": torch.get_num_threads(),
            "niceness": 0 if mode == "wait" else background_build.BUILD_NICENESS,
            "cache_dir": str(self.cache_dir),
            "max_cache_bytes": limit,
            "keep": [str(self.library_path(shape)) for shape in self.shapes],
            "jobs": [
                {"batch_range": list(shape[:2]), "query_len": query_len_of(shape), "path": str(p)}
                for shape, p in missing
            ],
        }
        self.pending = [shape for shape, _ in missing]
        what = describe_pending(self.pending, self.verify.query_len)
        logger.warning(
            "building %s of %s %s into %s (once for this model and tessellm version)",
            what,
            self.model_name,
            "before serving"
            if mode == "wait"
            else "in the background; they run eagerly until each is ready",
            directory,
        )
        directory.mkdir(parents=True, exist_ok=True)
        self._build_start = time.monotonic()
        # The reader thread must not keep the runner alive (nor the runner the build).
        handler = weakref.WeakMethod(self._on_event)
        self._build = background_build.BuildProcess(
            payload,
            directory / f"build-{os.getpid()}-{id(self):x}.log",
            lambda event: (h := handler()) is not None and h(event),
            f"{what} of {self.model_name}",
        )
        weakref.finalize(self, self._build.kill)

    # -- progress (the build's reader thread) ------------------------------------------
    def _on_event(self, event: dict) -> None:
        kind = event.get("event")
        batch_range = tuple(event.get("batch_range", ()))
        shape = library_shape(batch_range, event.get("query_len", 1)) if batch_range else ()
        elapsed = time.monotonic() - self._build_start
        label = f"{describe_shape(shape)} of {self.model_name}" if shape else ""
        if kind == "waiting":
            logger.warning("waiting for another process's build in %s", self.cache_dir)
        elif kind == "exporting":
            logger.info("CPU %s: exporting (%.1f s in)", label, elapsed)
        elif kind == "exported":
            logger.warning(
                "CPU %s: exported in %.1f s, compiling (%.1f s after start)",
                label,
                event["seconds"],
                elapsed,
            )
        elif kind == "built":
            with self._lock:
                self._arrived.append((shape, self.library_path(shape)))
                self.pending = [r for r in self.pending if r != shape]
            phases = (
                "built by another process"
                if event.get("cached")
                else f"export {event['export_seconds']:.1f} s, compile "
                f"{event['compile_seconds']:.1f} s, {event['bytes'] / 1e6:.1f} MB"
            )
            logger.warning(
                "CPU %s ready %.1f s after start (%s): such batches run compiled from the "
                "next step",
                label,
                elapsed,
                phases,
            )
        elif kind == "failed":
            self._fail(f"{event['reason']} (building the {describe_shape(shape)})")
        elif kind == "exit":
            if self._build.killed:  # stopped on purpose (close, exit)
                self.pending = []
            elif self.pending:  # died without saying why (killed, out of memory, a crash)
                from tessellm_cpu.background_build import last_log_line

                last = last_log_line(self._build.log_path)
                code = event["returncode"]
                self._fail(f"the build process exited with code {code}: {last}".rstrip(": "))
            elif event["returncode"] == 0:
                with contextlib.suppress(OSError):
                    self._build.log_path.unlink()

    def _fail(self, reason: str) -> None:
        with self._lock:
            ranges, self.pending = self.pending, []
        if self.failure is None:
            self.failure = reason
        if ranges and self._build is not None:
            logger.warning(
                "CPU steps for %s run eagerly (compiling failed: %s; log: %s)",
                " and ".join(describe_shape(r) for r in ranges),
                reason,
                self._build.log_path,
            )

    # -- waiting, stopping ---------------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the background build to end (at most ``timeout`` seconds) and load
        what it built; True when every batch range has its library."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._build is not None and not self._build.done.is_set():
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                break
            self._build.done.wait(left)  # short waits: Ctrl-C stays prompt
        self._adopt()
        loaded = len(self._libraries) + len(self.verify.libraries)
        return not self.pending and loaded == len(self.shapes)

    def close(self) -> None:
        """Stop a build in progress (its compilers too); loaded libraries stay usable."""
        self.pending = []
        if self._build is not None:
            self._build.kill()

    def _adopt(self) -> None:
        """Load the libraries built since the last call (the engine's thread, between two
        steps, or a thread in wait_ready: the list is replaced whole, never edited in
        place under a step that reads it)."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
            for shape, path in arrived:
                try:
                    self._add_library(shape, load_library(path))
                except Exception as exc:  # removed or corrupt meanwhile: that range stays eager
                    self.failure = self.failure or f"{type(exc).__name__}: {exc}"
                    logger.warning("cannot load %s: %s; its batches stay eager", path, exc)

    # -- running -----------------------------------------------------------------------
    def yield_core(self) -> None:
        """One thread fewer for the engine's steps while a background build runs.

        The build (export, then a C++ compiler) keeps one core busy; OpenMP steps that
        still ask for every core wait at each op's barrier for a thread the scheduler gave
        to the build: a 30-token prefill of the default model took 2.9 s instead of 0.2 s
        on 2 cores with the build running (bench/RESULTS.md, 2026-12-06). Called in the
        engine's thread (OpenMP's thread count belongs to the thread that sets it)."""
        building = self._build is not None and self.pending and self._build.running()
        wanted = max(1, self.threads - 1) if building else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor | None:
        if self._arrived:  # a library finished building: switch between two steps
            self._adopt()
        if self._build is not None:
            self.yield_core()
        n = input_ids.shape[0]
        if metadata.max_query_len != 1:  # several tokens per sequence: drafts to verify?
            return self.verify.run(input_ids, positions, metadata, self._static, self.num_groups)
        if n != metadata.num_seqs:
            return None
        groups = step_inputs(metadata, self.num_groups) if self.num_groups > 1 else []
        if groups is None:
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
                    *groups,
                ]
                self.steps += 1
                return library.boxed_run(inputs)[0]
        return None
