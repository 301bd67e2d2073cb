"""Batched multi-LoRA kernels (Triton shrink and expand) against a per-token reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) in fp32
on tiny shapes: ranks 8 and 16, plain and three-piece (q/k/v) widths, several slots with
tokens of no adapter (-1) among them, interleaved and uneven segments (one longer than a
64-row tile), batch 1, split-K with a ragged last step, expands at column offsets into
views of wider matrices, both the segment and the per-token paths. The engine runs a
mixed batch through the kernels and through the torch path with the same tokens. On a
GPU (``gpu`` marker) the same cases run in bf16 too, and the engine's kernel path is
checked against its torch path there.
"""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import save_tiny_model, tiny_llama_config, use_triton_plugins

use_triton_plugins("kernels/triton/src")

import tessellm_triton_kernels.lora as lora_kernels  # noqa: E402
from tessellm import LLM, SamplingParams  # noqa: E402
from tessellm.interfaces.ops import FusedOps, LoRATokens  # noqa: E402
from tessellm.lora import LoRARequest  # noqa: E402
from tessellm.lora.graph_inputs import LoRAGraphInputs  # noqa: E402
from tessellm.lora.slots import token_layout  # noqa: E402
from tessellm.testing.lora import ALL_PROJECTIONS, write_random_adapter  # noqa: E402
from tessellm_triton_kernels.ops import ALL_OPS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter emulates bf16 through numpy; fp32 is what it runs exactly.
DTYPES = [torch.float32, torch.bfloat16] if DEVICE.type == "cuda" else [torch.float32]
NUM_SLOTS = 4
LAYOUTS = {
    "mixed": [2, -1, 0, 0, 3, 2, 2, -1, 0, 1, 2],
    "decode": [3, 0, -1, 1, 2],
    "batch1": [1],
    "long": [0] * 5 + [-1] * 3 + [2] * 70 + [1] * 17,
    "no_adapter": [-1, -1, -1],
}
gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device")


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}


@pytest.fixture(params=["segment", "token"])
def path(request, monkeypatch):
    """Which kernels run: both are correct for every layout."""
    limit = 0 if request.param == "segment" else 1 << 30
    monkeypatch.setattr(lora_kernels, "PER_TOKEN_MAX_TOKENS", limit)
    return request.param


def reference_shrink(x, a, slots, scale):
    rows = [
        x[t].double() @ a[s].double().T * scale if s >= 0 else torch.zeros(a.shape[1]).double()
        for t, s in enumerate(slots)
    ]
    return torch.stack([r.to(x.device) for r in rows])


def reference_expand(u, b, out, slots, offset):
    want = out.double().clone()
    n = b.shape[1]
    for t, s in enumerate(slots):
        if s >= 0:
            want[t, offset : offset + n] += u[t].to(b.dtype).double() @ b[s].double().T
    return want


def test_token_layout_groups_tokens_by_slot():
    tokens = token_layout(torch.tensor(LAYOUTS["mixed"]), NUM_SLOTS, torch.device("cpu"))
    assert tokens.starts.tolist() == [0, 3, 4, 8, 9]
    assert tokens.order.tolist()[:9] == [2, 3, 8, 9, 0, 5, 6, 10, 4]
    assert sorted(tokens.order.tolist()[9:]) == [1, 7]  # no adapter: after every slot
    assert tokens.max_tokens_per_slot == 4
    assert tokens.slots.dtype == tokens.order.dtype == tokens.starts.dtype == torch.int32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
# k=200: split-K (partial sums added atomically, one 64-wide step per split here) with a
# ragged last step.
@pytest.mark.parametrize(("rank", "pieces", "k"), [(8, 1, 40), (16, 1, 200), (8, 3, 72)])
def test_shrink_matches_reference(path, dtype, layout, rank, pieces, k, monkeypatch):
    monkeypatch.setattr(lora_kernels, "MIN_K_STEPS_PER_SPLIT", 1)
    slots = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(rank * k + len(slots))
    # x as strided rows (every other row of a wider buffer), as a split would give.
    x = torch.randn(2 * len(slots), k + 8, generator=gen)[::2, :k].to(DEVICE, dtype)
    a = torch.randn(NUM_SLOTS, rank * pieces, k, generator=gen).to(DEVICE, dtype)
    tokens = token_layout(torch.tensor(slots), NUM_SLOTS, DEVICE)
    y = lora_kernels.lora_shrink(x, a, tokens, 0.5)
    assert y.dtype == torch.float32 and y.shape == (len(slots), rank * pieces)
    torch.testing.assert_close(y.double(), reference_shrink(x, a, slots, 0.5), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("rank", "offset"), [(8, 0), (16, 5)])
def test_expand_adds_at_column_offset(path, dtype, layout, rank, offset):
    slots = LAYOUTS[layout]
    n, t = 70, len(slots)
    gen = torch.Generator().manual_seed(rank + offset + t)
    # The middle piece of three-piece matrices (a fused q/k/v layer's k), as views.
    wide_b = torch.randn(NUM_SLOTS, n + 20, 3 * rank, generator=gen).to(DEVICE, dtype)
    b = wide_b[:, 10 : 10 + n, rank : 2 * rank]
    u = torch.randn(t, 3 * rank, generator=gen).to(DEVICE)[:, rank : 2 * rank]
    out = torch.randn(t, n + 20, generator=gen).to(DEVICE, dtype)
    want = reference_expand(u, b, out, slots, offset)
    tokens = token_layout(torch.tensor(slots), NUM_SLOTS, DEVICE)
    result = lora_kernels.lora_expand(u, b, out, tokens, offset)
    assert result is out
    torch.testing.assert_close(out.double(), want, **tolerance(dtype))
    if layout == "no_adapter":
        assert torch.equal(out.double(), want)


def test_long_inputs_are_split():
    splits, per_split = lora_kernels._split_k(600, 64, 11)
    assert splits > 1 and per_split % 64 == 0 and (splits - 1) * per_split < 600
    assert lora_kernels._split_k(40, 64, 11) == (1, 64)


def test_shapes_that_do_not_fit_are_refused():
    tokens = token_layout(torch.tensor([0, 1]), 2, DEVICE)
    with pytest.raises(ValueError, match="columns"):
        lora_kernels.lora_shrink(torch.ones(2, 8), torch.ones(2, 4, 16), tokens)
    with pytest.raises(ValueError, match="cannot take"):
        lora_kernels.lora_expand(
            torch.ones(2, 4), torch.ones(2, 8, 4), torch.ones(2, 10), tokens, 4
        )
    with pytest.raises(ValueError, match="LoRATokens for 2 tokens"):
        lora_kernels.lora_shrink(torch.ones(3, 16), torch.ones(2, 4, 16), tokens)


# ------------------------------------------------------------------- through the engine


def lora_only_ops(calls: list[str]) -> FusedOps:
    """The Triton table's LoRA entries alone, counting their launches."""

    def counted(name):
        def call(*args):
            calls.append(name)
            return ALL_OPS[name](*args)

        return call

    return FusedOps(lora_shrink=counted("lora_shrink"), lora_expand=counted("lora_expand"))


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-triton")
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4)
    model_dir = save_tiny_model(config, root / "base")
    specs = [(8, ALL_PROJECTIONS), (16, ("q_proj", "v_proj")), (16, ("o_proj", "down_proj"))]
    adapters = [
        write_random_adapter(model_dir, root / f"a{i}", rank, seed=i, std=0.2, targets=targets)
        for i, (rank, targets) in enumerate(specs)
    ]
    return model_dir, [LoRARequest(f"a{i + 1}", i + 1, p) for i, p in enumerate(adapters)]


def mixed_generate(llm, loras, new_tokens: int, base_only: bool = False) -> list[list[int]]:
    """Eight prompts of 2 to 5 tokens: three adapters and the base model mixed (uneven
    groups: two requests for a1, a2 and a3 each, two for the base model)."""
    prompts = [[5 + i, 17, 42 + 3 * i, 9, 100 + i][: 2 + i % 4] for i in range(8)]
    requests = [None, *loras, loras[0], None, loras[2], loras[1]]
    if base_only:
        requests = [None] * len(prompts)
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests)
    return [o.outputs[0].token_ids for o in outs]


ENGINE_KWARGS = dict(dtype="float32", enable_lora=True, max_loras=3, max_lora_rank=16)


@pytest.fixture(scope="module")
def cpu_kernel_engine(lora_model, tmp_path_factory):
    """A CPU engine whose platform table holds the LoRA kernels alone (in the
    interpreter), and the list their launches go into."""
    if DEVICE.type == "cuda":
        pytest.skip("the GPU tests run the real platform")
    from tessellm_cpu.platform import CpuPlatform

    model_dir, _ = lora_model
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:  # the table is read while the engine loads
        patch.setattr(CpuPlatform, "fused_ops", lambda self, dtype: lora_only_ops(calls))
        llm = LLM(model=str(model_dir), device="cpu", **ENGINE_KWARGS,
                  download_dir=str(tmp_path_factory.mktemp("cache")))  # fmt: skip
    return llm, calls


def test_engine_kernel_path_equals_torch_path(lora_model, cpu_kernel_engine, tmp_path):
    """A mixed batch (three adapters, the base model) on the CPU through the kernels in
    the interpreter gives the torch path's tokens; the kernels ran."""
    model_dir, loras = lora_model
    torch_llm = LLM(model=str(model_dir), device="cpu", **ENGINE_KWARGS,
                    download_dir=str(tmp_path))  # fmt: skip
    assert torch_llm.engine.executor.runner.lora.step.kernels is None
    reference = mixed_generate(torch_llm, loras, 3)
    base = mixed_generate(torch_llm, loras, 3, base_only=True)
    assert all(reference[i] != base[i] for i in (1, 2, 3))  # every adapter changes tokens
    llm, calls = cpu_kernel_engine
    assert llm.engine.executor.runner.lora.step.kernels is not None
    calls.clear()
    assert mixed_generate(llm, loras, 3) == reference
    assert 0 < calls.count("lora_shrink") < calls.count("lora_expand")


def test_graph_buffers_serve_any_mix(lora_model, cpu_kernel_engine):
    """What a CUDA graph replays: every adapted layer's kernels over the static buffers,
    captured for 8 tokens of no adapter (the base layer's output), then given a step's
    5-token layout (padding rows marked -1) give that step's own rows."""
    _, loras = lora_model
    runner = cpu_kernel_engine[0].engine.executor.runner
    manager, step = runner.lora, runner.lora.step
    for lora in loras:
        manager._slot(lora, set())
    inputs = LoRAGraphInputs.of(runner.model, 8, DEVICE)
    modules = dict(runner.model.named_modules())
    slots = torch.tensor([2, -1, 0, 2, 1])
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for name in manager.layers:
        layer = modules[name]
        x = torch.randn(8, layer.in_features, generator=gen)
        plain = layer.quant.apply(layer, x, layer.bias)
        with inputs.capturing(8):
            torch.testing.assert_close(layer(x), plain)
        step.tokens, step.slots = token_layout(slots, 3, DEVICE), {0, 1, 2}
        want = layer(x[:5])
        changed += not torch.allclose(want, plain[:5])
        inputs.copy_in(5, 8)
        step.tokens = LoRATokens(inputs.slots, inputs.order, inputs.starts, 8)
        step.every_layer = True
        replayed = layer(x)
        manager.clear()
        step.every_layer = False
        torch.testing.assert_close(replayed[:5], want)
        torch.testing.assert_close(replayed[5:], plain[5:])
    assert changed == len(manager.layers)  # every layer is adapted by some slot


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_engine_kernels_equal_torch_path(lora_model, dtype, tmp_path, monkeypatch):
    """The CUDA platform's LoRA kernels against its torch path, same engine settings: in
    fp32 the same greedy tokens; in bf16 the same first token everywhere, and at most two
    sequences of eight may part later (a near tie broken by another rounding)."""
    model_dir, loras = lora_model
    kwargs = dict(model=str(model_dir), **{**ENGINE_KWARGS, "dtype": dtype},
                  gpu_memory_utilization=0.2, max_num_seqs=16)  # fmt: skip
    results = {}
    for use_kernels in (True, False):
        if not use_kernels:  # every other fused op kept: only the LoRA path changes
            others = [name for name in ALL_OPS if not name.startswith("lora_")]
            monkeypatch.setenv("TESSELLM_FUSED_OPS", ",".join(others))
        llm = LLM(**kwargs)
        runner = llm.engine.executor.runner
        assert runner.device.type == "cuda"
        assert (runner.lora.step.kernels is not None) == use_kernels
        results[use_kernels] = mixed_generate(llm, loras, 12)
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    kernels, torch_path = results[True], results[False]
    if dtype == "float32":
        assert kernels == torch_path
    else:
        parted = [i for i, (k, t) in enumerate(zip(kernels, torch_path, strict=True)) if k != t]
        assert len(parted) <= 2 and all(kernels[i][0] == torch_path[i][0] for i in parted)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 700])
def test_gpu_bf16_llama_shapes(num_tokens):
    """Llama-3-8B's q/k/v widths, 8 slots of rank 16, against the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    k, n, r, slots_n = 4096, 6144, 16, 8
    slots = torch.randint(-1, slots_n, (num_tokens,), generator=gen, device="cuda").cpu()
    x = torch.randn(num_tokens, k, device="cuda", generator=gen).bfloat16()
    a = (torch.randn(slots_n, r, k, device="cuda", generator=gen) * 0.02).bfloat16()
    b = (torch.randn(slots_n, n, r, device="cuda", generator=gen) * 0.02).bfloat16()
    out = torch.randn(num_tokens, n + 128, device="cuda", generator=gen).bfloat16()
    tokens = token_layout(slots, slots_n, DEVICE)
    y = lora_kernels.lora_shrink(x, a, tokens, 2.0)
    listed = slots.tolist()
    torch.testing.assert_close(
        y.double(), reference_shrink(x, a, listed, 2.0), atol=2e-2, rtol=2e-2
    )
    want = reference_expand(y, b, out, listed, 128)
    lora_kernels.lora_expand(y, b, out, tokens, 128)
    torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)


def counting_lora_replays(graph_runner) -> list[int]:
    """Wraps the graph runner's LoRA layout copy (one per LoRA graph replay): the batch
    size of each replay goes into the returned list."""
    replays: list[int] = []
    copy_in = graph_runner.lora.copy_in

    def counted(n: int, size: int) -> None:
        replays.append(n)
        copy_in(n, size)

    graph_runner.lora.copy_in = counted
    return replays


@pytest.mark.gpu
@gpu
def test_gpu_lora_decode_steps_replay_graphs(lora_model):
    """With the LoRA kernels, decode steps with adapters replay CUDA graphs (one per
    batch size, whatever the mix) and give the eager engine's tokens (fp32)."""
    model_dir, loras = lora_model
    kwargs = dict(model=str(model_dir), **ENGINE_KWARGS, gpu_memory_utilization=0.2,
                  max_num_seqs=16)  # fmt: skip
    eager = LLM(**kwargs, enforce_eager=True)
    assert eager.engine.executor.runner.graph_runner is None
    want = mixed_generate(eager, loras, 12)
    del eager
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(**kwargs)
    graphs = llm.engine.executor.runner.graph_runner
    assert graphs.serves_lora and set(graphs.lora_graphs) == set(graphs.graphs)
    replays = counting_lora_replays(graphs)
    assert mixed_generate(llm, loras, 12) == want
    assert len(replays) >= 10  # the mixed batch's decode steps


def test_eager_warm_up_runs_the_lora_kernels_at_each_row_tile(
    lora_model, cpu_kernel_engine, monkeypatch
):
    """The start-up warm-up of eager steps (CUDA's ``Platform.warm_eager_steps``) runs each
    query length again through the LoRA kernels, a slot's token count that length (so
    each row tile compiles), and leaves no step layout behind; generation is unchanged."""
    from tessellm.engine.profile_run import warm_eager_steps

    _, loras = lora_model
    llm, _ = cpu_kernel_engine
    runner = llm.engine.executor.runner
    before = mixed_generate(llm, loras, 3)
    seen = []
    shrink = ALL_OPS["lora_shrink"]

    def recording(x, a, tokens, scale):
        seen.append((x.shape[0], tokens.max_tokens_per_slot))
        return shrink(x, a, tokens, scale)

    monkeypatch.setitem(ALL_OPS, "lora_shrink", recording)
    lengths = warm_eager_steps(runner)
    assert lengths == [2, 4, 8, 16, 32, 64]
    assert sorted(set(seen)) == [(n, n) for n in lengths]
    assert runner.lora.step.tokens is None and not runner.lora.step.every_layer
    assert mixed_generate(llm, loras, 3) == before
