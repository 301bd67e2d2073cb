"""bf16/fp16 attention computed in fp32 on CPUs without native support, and kept in its
own dtype where the CPU has it: both branches of ``attention_compute_dtype`` forced,
compared with paged attention computed in float64, and which dtype the matmuls and
conversions actually ran in (recorded by a dispatch mode)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tessellm.interfaces.attention import AttentionMetadata, AttentionSpec
from tessellm_attention_cpu import backend as backend_module
from tessellm_attention_cpu import precision
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_cpu.plan import build_plan

LOW = (torch.bfloat16, torch.float16)
# (tokens already cached, query tokens) per sequence.
DECODE = [(40, 1), (17, 1), (0, 1), (63, 1)]
PREFILL = [(0, 21), (0, 5)]
MIXED = [(30, 1), (0, 18), (33, 7), (9, 1), (0, 1)]
# Enough decodes for the block-diagonal decode, with a chunked prefill beside them.
MANY = [(n, 1) for n in (70, 33, 15, 0, 16, 47, 5, 31, 64, 2)] + [(20, 6)]
BATCHES = {"decode": DECODE, "prefill": PREFILL, "mixed": MIXED, "many": MANY}
SPARE_BLOCKS = 200  # blocks no sequence uses: a conversion of the whole cache shows
# Outputs are averages of unit-variance values: bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.bfloat16: 2.5e-2, torch.float16: 4e-3}


def emulated(dtype: torch.dtype) -> torch.dtype:
    """The rule on a CPU without native bf16/fp16 (this branch is forced in tests)."""
    return torch.float32 if dtype in LOW else dtype


def native(dtype: torch.dtype) -> torch.dtype:
    return dtype


class Step:
    """A step with scattered block tables; cache entries outside every context are huge,
    so reading one shows in the output."""

    def __init__(
        self,
        seqs: list[tuple[int, int]],
        dtype: torch.dtype,
        seed: int = 0,
        consecutive: bool = False,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        block_size, heads, kv_heads, head_size = 8, 6, 2, 16
        seq_lens = [cached + q for cached, q in seqs]
        per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(per_seq) + SPARE_BLOCKS
        # Consecutive blocks: a lone sequence attends over a view of the cache.
        order = (
            torch.arange(num_blocks) if consecutive else torch.randperm(num_blocks, generator=gen)
        )
        tables = torch.full((len(seqs), max(per_seq) + 1), int(order[-1]), dtype=torch.int32)
        shape = (num_blocks, block_size, kv_heads, head_size)
        self.k_cache = torch.full(shape, 300.0).to(dtype)
        self.v_cache = torch.full(shape, -300.0).to(dtype)
        used, slots = 0, []
        for s, n in enumerate(seq_lens):
            tables[s, : per_seq[s]] = order[used : used + per_seq[s]].to(torch.int32)
            used += per_seq[s]
            pos = torch.arange(n)
            flat = tables[s, pos // block_size].long() * block_size + pos % block_size
            for cache in (self.k_cache, self.v_cache):
                values = torch.randn((n, kv_heads, head_size), generator=gen)
                cache.view(-1, kv_heads, head_size)[flat] = values.to(dtype)
            slots.append(flat[n - seqs[s][1] :])
        q_lens = [q for _, q in seqs]
        self.query = torch.randn((sum(q_lens), heads, head_size), generator=gen).to(dtype)
        starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.metadata = AttentionMetadata(
            query_start_loc=starts,
            seq_lens=lens,
            block_tables=tables,
            slot_mapping=torch.cat(slots),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=starts,
            seq_lens_cpu=lens,
        )
        self.seqs, self.tables, self.starts = seqs, tables, starts
        self.spec = AttentionSpec("cpu", dtype, head_size, heads, kv_heads, block_size)
        self.scale = head_size**-0.5

    def reference(self, window: int | None = None, cap: float | None = None) -> torch.Tensor:
        """Paged attention's definition per sequence, in float64."""
        kv_heads, head_size = self.k_cache.shape[2:]
        group = self.spec.num_heads // kv_heads
        out = []
        for s, (cached, q_len) in enumerate(self.seqs):
            n = cached + q_len
            blocks = self.tables[s].long()
            k = self.k_cache[blocks].reshape(-1, kv_heads, head_size)[:n].double()
            v = self.v_cache[blocks].reshape(-1, kv_heads, head_size)[:n].double()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            start = int(self.starts[s])
            q = self.query[start : start + q_len].double()
            scores = torch.einsum("qhd,khd->hqk", q, k) * self.scale
            if cap:
                scores = cap * torch.tanh(scores / cap)
            q_pos, k_pos = torch.arange(cached, n)[:, None], torch.arange(n)[None, :]
            visible = k_pos <= q_pos
            if window:
                visible &= q_pos - k_pos < window
            scores = scores.masked_fill(~visible, float("-inf"))
            out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        return torch.cat(out)

    def run(self, backend: CpuPagedAttention, **kw) -> torch.Tensor:
        self.metadata.extra.clear()
        backend.prepare(self.metadata)
        return backend.forward(
            self.query, self.k_cache, self.v_cache, self.metadata, scale=self.scale, **kw
        )


class OpDtypes(TorchDispatchMode):
    """Records the floating dtypes each aten op reads, and the size of every conversion
    (``_to_copy``, or ``copy_`` between dtypes) and gathers (``index_select``) of keys or
    values: of a tensor whose last dims are ``kv_shape``."""

    def __init__(self, kv_shape: tuple[int, int]) -> None:
        super().__init__()
        self.kv_shape = kv_shape
        self.reads: dict[str, set[torch.dtype]] = {}
        self.kv_gathers = 0
        self.converted_kv_numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        floats = {t.dtype for t in tensors if t.is_floating_point()}
        self.reads.setdefault(name, set()).update(floats)
        if name == "index_select" and tuple(args[0].shape[-2:]) == self.kv_shape:
            self.kv_gathers += 1
        out = func(*args, **kwargs)
        if name == "_to_copy" or (name == "copy_" and len(floats) > 1):
            source = args[1] if name == "copy_" else args[0]
            if tuple(source.shape[-2:]) == self.kv_shape:
                self.converted_kv_numels.append(source.numel())
        return out

    def dtypes_of(self, *names: str) -> set[torch.dtype]:
        return set().union(*(self.reads.get(name, set()) for name in names))


DECODE_OPS = ("bmm", "mm", "matmul")
SDPA_OP = "_scaled_dot_product_flash_attention_for_cpu"
ATTENTION_OPS = (*DECODE_OPS, SDPA_OP)


def backend_with(rule, spec: AttentionSpec, monkeypatch) -> CpuPagedAttention:
    monkeypatch.setattr(precision, "attention_compute_dtype", rule)
    return CpuPagedAttention(spec)


@pytest.mark.parametrize("rule", [emulated, native])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_matches_float64_reference(batch, dtype, rule, monkeypatch):
    step = Step(BATCHES[batch], dtype)
    backend = backend_with(rule, step.spec, monkeypatch)
    assert backend.compute_dtype == rule(dtype)
    out = step.run(backend)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), step.reference(), atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize("rule", [emulated, native])
@pytest.mark.parametrize("batch", ["mixed", "many"])
def test_window_and_soft_cap(batch, rule, monkeypatch):
    step = Step(BATCHES[batch], torch.bfloat16, seed=1)
    backend = backend_with(rule, step.spec, monkeypatch)
    for kw in ({"sliding_window": 5}, {"logits_soft_cap": 4.0}):
        expected = step.reference(kw.get("sliding_window"), kw.get("logits_soft_cap"))
        torch.testing.assert_close(step.run(backend, **kw).double(), expected, atol=2.5e-2, rtol=0)


@pytest.mark.parametrize("batch", ["decode", "mixed", "many"])
def test_emulated_rule_runs_decode_matmuls_in_fp32_on_gathered_blocks_only(batch, monkeypatch):
    step = Step(BATCHES[batch], torch.bfloat16, seed=2)
    backend = backend_with(emulated, step.spec, monkeypatch)
    with OpDtypes(step.k_cache.shape[2:]) as ops:
        step.run(backend)
    assert ops.dtypes_of(*DECODE_OPS) == {torch.float32}
    # Prefill rows stay in the cache's dtype (test_prefill_rows_keep_the_cache_dtype).
    assert ops.dtypes_of(SDPA_OP) <= {torch.bfloat16}
    # Converted: each group's gathered blocks (at most every sequence padded to the
    # longest), never the cache.
    widest = max(-(-(cached + q) // step.spec.block_size) for cached, q in step.seqs)
    gathered = len(step.seqs) * widest * step.k_cache[0].numel()
    assert gathered < step.k_cache.numel() // 2
    assert ops.converted_kv_numels and max(ops.converted_kv_numels) <= gathered


@pytest.mark.parametrize("batch", ["prefill", "many"])
def test_native_rule_keeps_bf16_matmuls(batch, monkeypatch):
    step = Step(BATCHES[batch], torch.bfloat16, seed=3)
    backend = backend_with(native, step.spec, monkeypatch)
    with OpDtypes(step.k_cache.shape[2:]) as ops:
        step.run(backend)
    assert torch.bfloat16 in ops.dtypes_of(*ATTENTION_OPS)


@pytest.mark.parametrize("rule", [emulated, native])
@pytest.mark.parametrize("per_chunk", [1, 3])
def test_decode_in_chunks_of_sequences(per_chunk, rule, monkeypatch):
    step = Step(MANY, torch.bfloat16, seed=4)
    backend = backend_with(rule, step.spec, monkeypatch)
    decode = build_plan(step.metadata, step.spec.block_size).decode
    seq_bytes = 2 * decode.num_blocks * step.k_cache[0].numel() * rule(torch.bfloat16).itemsize
    monkeypatch.setattr(backend_module, "DECODE_CHUNK_BYTES", per_chunk * seq_bytes)
    with OpDtypes(step.k_cache.shape[2:]) as ops:
        out = step.run(backend)
    # Keys and values gathered once per chunk (the prefill beside them once more at most).
    chunks = math.ceil(decode.num_seqs / per_chunk)
    assert 2 * chunks <= ops.kv_gathers <= 2 * chunks + 2
    torch.testing.assert_close(out.double(), step.reference(), atol=2.5e-2, rtol=0)
    out = step.run(backend, sliding_window=6, logits_soft_cap=3.0)
    torch.testing.assert_close(out.double(), step.reference(6, 3.0), atol=2.5e-2, rtol=0)


def bf16_ulps(out: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``|out - exact|`` in units of bf16's spacing at ``exact``'s magnitude."""
    spacing = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-6))) - 7)
    return (out.double() - exact).abs() / spacing


WINDOW_AND_CAP = [{}, {"sliding_window": 5}, {"logits_soft_cap": 4.0}]


@pytest.mark.parametrize("kw", WINDOW_AND_CAP, ids=["plain", "window", "cap"])
@pytest.mark.parametrize("per_chunk", [None, 3])
@pytest.mark.parametrize("batch", ["decode", "mixed", "many"])
def test_fp32_decode_rows_are_the_float64_result_rounded(batch, per_chunk, kw, monkeypatch):
    # The loose tolerance above admits a wrong mask, scale or head mapping of small
    # effect; computed in fp32, a decode row is the exact result rounded to bf16.
    step = Step(BATCHES[batch], torch.bfloat16, seed=5)
    backend = backend_with(emulated, step.spec, monkeypatch)
    decode = build_plan(step.metadata, step.spec.block_size).decode
    if per_chunk:
        seq_bytes = 2 * decode.num_blocks * step.k_cache[0].numel() * 4
        monkeypatch.setattr(backend_module, "DECODE_CHUNK_BYTES", per_chunk * seq_bytes)
    rows = torch.cat(
        [
            torch.arange(int(step.starts[s]), int(step.starts[s + 1]))
            for s, (_, q) in enumerate(step.seqs)
            if q == 1
        ]
    )
    out = step.run(backend, **kw)[rows]
    exact = step.reference(kw.get("sliding_window"), kw.get("logits_soft_cap"))[rows]
    assert bf16_ulps(out, exact).max() <= 0.51
    assert (out != exact.to(torch.bfloat16)).float().mean() < 0.01


@pytest.mark.parametrize("kw", WINDOW_AND_CAP, ids=["plain", "window", "cap"])
@pytest.mark.parametrize(
    ("batch", "consecutive"),
    [("prefill", False), ("mixed", False), ("many", False), ("lone", True)],
)
def test_prefill_rows_keep_the_cache_dtype(batch, consecutive, kw, monkeypatch):
    # Regression (issue 16): prefill attended in fp32 rounded every prompt's attention
    # differently from the bf16 SDPA, for no speed; the default model's greedy answer
    # to the README question sits on a one-ulp tie of its bf16 logits and flipped. The
    # prefill rows of a CPU without native bf16 equal the native rule's, bit for bit.
    seqs = [(0, 21)] if batch == "lone" else BATCHES[batch]
    step = Step(seqs, torch.bfloat16, seed=6, consecutive=consecutive)
    plan = build_plan(step.metadata, step.spec.block_size)
    assert (plan.prefill.first_block is not None) == consecutive
    as_native = step.run(backend_with(native, step.spec, monkeypatch), **kw)
    emulated_out = step.run(backend_with(emulated, step.spec, monkeypatch), **kw)
    rows = plan.prefill.output_rows
    assert torch.equal(emulated_out[rows], as_native[rows])
    exact = step.reference(kw.get("sliding_window"), kw.get("logits_soft_cap"))
    torch.testing.assert_close(emulated_out.double(), exact, atol=2.5e-2, rtol=0)


@pytest.mark.parametrize(
    ("flags", "bf16", "fp16"),
    [
        (set(), torch.float32, torch.float32),
        ({"avx2", "fma"}, torch.float32, torch.float32),
        ({"avx512f", "avx512_bf16"}, torch.bfloat16, torch.float32),
        ({"amx_bf16", "amx_tile"}, torch.bfloat16, torch.float32),
        ({"avx512fp16", "avx512_bf16"}, torch.bfloat16, torch.float16),
        ({"asimd", "asimdhp", "bf16"}, torch.bfloat16, torch.float16),
    ],
)
def test_rule_follows_cpu_flags(flags, bf16, fp16, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert precision.attention_compute_dtype(torch.bfloat16) == bf16
    assert precision.attention_compute_dtype(torch.float16) == fp16
    assert precision.attention_compute_dtype(torch.float32) == torch.float32


def test_cpu_flags_reads_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    try:
        with open("/proc/cpuinfo") as f:
            has_flags = any(line.split(":")[0].strip() in ("flags", "Features") for line in f)
    except OSError:
        has_flags = False
    assert bool(flags) == has_flags
