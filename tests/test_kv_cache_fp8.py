"""fp8 KV cache (``kv_cache_dtype``, vLLM's name): config, capacity, checkpoint scales,
the torch reference backend end to end, the Triton kernels against it, refusals.

Without a GPU the Triton kernels run in Triton's interpreter on tiny shapes; the engine
cases run a tiny random Llama in fp32 on the CPU with the torch backend.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessellm import model_loader as ml
from tessellm.config import EngineArgs
from tessellm.engine.model_runner import ModelRunner
from tessellm.errors import ConfigError
from tessellm.interfaces.attention import AttentionSpec, kv_cache_torch_dtype
from tessellm.interfaces.schedule import ScheduledSeq, SchedulerOutput
from tessellm.plugins import get_plugins
from tessellm.sampling_params import SamplingParams
from tessellm_attention_cpu.backend import CpuPagedAttention
from tessellm_attention_torch.backend import TorchPagedAttention

if not torch.cuda.is_available():  # read when a Triton kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
PROMPT = list(range(3, 40))  # 37 tokens: three blocks of 16, the last one partial
NUM_BLOCKS = 8
# Measured on the tiny Llama (fp32, torch backend), largest |logit| about 2.2: first-step
# logits move by at most 0.066 (e4m3, scales 1.0), 0.17 (e5m2), 0.12 (e4m3 with the
# checkpoint scales below, one of which clamps values). A cache read with a scale left
# out (x180 here) or in the wrong layout moves them by far more.
FIRST_STEP_TOLERANCE = {"fp8": 0.15, "fp8_e5m2": 0.35}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from tessellm.testing import tiny_model

    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("llama"))


def make_runner(path: Path, kv_cache_dtype: str, **overrides) -> ModelRunner:
    settings = {
        "device": "cpu",
        "dtype": "float32",
        "attention_backend": "torch",
        "enforce_eager": True,
        "download_dir": str(path.parent / "cache"),
        **overrides,
    }
    args = EngineArgs(model=str(path), kv_cache_dtype=kv_cache_dtype, **settings)
    plugins = get_plugins()
    return ModelRunner(args, ml.resolve_model(plugins, args.model, args.cache_dir), plugins=plugins)


@torch.inference_mode()
def greedy_logits(runner: ModelRunner, steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill ``PROMPT`` then decode greedily: each step's logits and the tokens."""
    runner.initialize_cache(NUM_BLOCKS)
    tokens, start, rows = list(PROMPT), 0, []
    for _ in range(steps):
        ids = tokens[start:]
        seq = ScheduledSeq("r", ids, start, list(range(NUM_BLOCKS)), True, SamplingParams())
        input_ids, positions, metadata, sample_rows = runner.prepare_inputs(
            SchedulerOutput([seq], len(ids))
        )
        runner.attention.prepare(metadata)
        hidden = runner.model(input_ids, positions, metadata)
        logits = runner.model.compute_logits(hidden[sample_rows])[0]
        rows.append(logits)
        start = len(tokens)
        tokens.append(int(logits.argmax()))
    return torch.stack(rows), tokens[len(PROMPT) :]


def fake_quantizing(runner: ModelRunner, dtype: torch.dtype) -> None:
    """Make ``runner`` (a cache in the run dtype) store what an fp8 cache would hold,
    dequantized: the same arithmetic as the fp8 run, without fp8 storage."""
    write = runner.attention.write_kv

    def wrapped(key, value, k_cache, v_cache, metadata, **kw):
        layer = next(layer for layer in runner.attn_layers if layer.k_cache is k_cache)
        limit = torch.finfo(dtype).max
        k = (key / layer.k_scale).clamp(-limit, limit).to(dtype).float() * layer.k_scale
        v = (value / layer.v_scale).clamp(-limit, limit).to(dtype).float() * layer.v_scale
        write(k, v, k_cache, v_cache, metadata, **kw)

    runner.attention.write_kv = wrapped


def with_kv_scales(src: Path, dst: Path, scales: dict[int, dict[str, float]]) -> Path:
    """A copy of the checkpoint ``src`` with llm-compressor's per-layer KV scales added
    (``{layer: {"k_scale": s, "v_scale": s}}`` or ``{"kv_scale": s}``)."""
    dst.mkdir()
    for item in src.iterdir():
        if item.name != "model.safetensors":
            (dst / item.name).write_bytes(item.read_bytes())
    tensors = load_file(src / "model.safetensors")
    for layer, entries in scales.items():
        for name, value in entries.items():
            tensors[f"model.layers.{layer}.self_attn.{name}"] = torch.tensor(value)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------- config and capacity


def test_kv_cache_dtype_names():
    assert EngineArgs().kv_cache_dtype == "auto"
    for name in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
        EngineArgs(kv_cache_dtype=name)
    with pytest.raises(ConfigError, match=r"kv_cache_dtype 'int8'.*fp8_e5m2"):
        EngineArgs(kv_cache_dtype="int8")
    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == E4M3
    assert kv_cache_torch_dtype("fp8_e5m2", torch.float16) == E5M2


def test_fp8_cache_holds_twice_the_blocks_of_bf16(llama):
    budget = 6 * 2**20
    blocks = {
        kv: make_runner(llama, kv, dtype="bfloat16", kv_cache_memory_bytes=budget)
        for kv in ("auto", "fp8", "fp8_e5m2")
    }
    counts = {kv: runner.available_blocks() for kv, runner in blocks.items()}
    assert counts["auto"] > 0
    assert counts["fp8"] == counts["fp8_e5m2"] == 2 * counts["auto"]
    runner = blocks["fp8"]
    runner.initialize_cache(counts["fp8"])
    layer = runner.attn_layers[0]
    assert layer.k_cache.dtype == layer.v_cache.dtype == E4M3
    cache_bytes = sum(2 * a.k_cache.numel() for a in runner.attn_layers)  # 1 byte each
    assert cache_bytes <= budget < cache_bytes + runner.bytes_per_block()


# ---------------------------------------------------------------- torch backend, end to end


@pytest.mark.parametrize("kv", ["fp8", "fp8_e5m2"])
def test_fp8_cache_logits_near_the_fp32_cache(llama, kv):
    exact, _ = greedy_logits(make_runner(llama, "auto"), steps=1)
    runner = make_runner(llama, kv)
    assert runner.attention_choice.chosen == "torch"
    fp8, tokens = greedy_logits(runner, steps=6)
    assert runner.attn_layers[0].k_cache.dtype == kv_cache_torch_dtype(kv, torch.float32)
    assert len(tokens) == 6 and all(0 <= t < 256 for t in tokens)
    error = (fp8[0] - exact[0]).abs().max().item()
    assert 1e-4 < error < FIRST_STEP_TOLERANCE[kv]  # quantized, and not by a wrong scale
    # Every step equals a cache in fp32 holding the same quantized values.
    reference = make_runner(llama, "auto")
    fake_quantizing(reference, kv_cache_torch_dtype(kv, torch.float32))
    simulated, simulated_tokens = greedy_logits(reference, steps=6)
    assert simulated_tokens == tokens
    torch.testing.assert_close(fp8, simulated, atol=2e-5, rtol=2e-5)


def test_fp8_cache_generates_through_the_engine(llama):
    from tessellm.engine.llm_engine import LLMEngine

    args = EngineArgs(
        model=str(llama),
        device="cpu",
        dtype="float32",
        kv_cache_dtype="fp8",
        enforce_eager=True,
        num_gpu_blocks_override=NUM_BLOCKS,
        download_dir=str(llama.parent / "cache"),
    )
    engine = LLMEngine(args)
    try:
        engine.add_request("0", PROMPT, SamplingParams(temperature=0.0, max_tokens=5))
        finished = []
        while engine.has_unfinished_requests():
            finished += [out for out in engine.step() if out.finished]
        assert len(finished[0].outputs[0].token_ids) == 5
    finally:
        engine.shutdown()


def test_checkpoint_scales_are_loaded_and_stored_bytes_decode_to_k_over_scale(llama, tmp_path):
    # |k|, |v| reach about 2.3: scales that use e4m3's range, one too small (values
    # clamped), one kv_scale for both.
    scales = {0: {"k_scale": 2.5 / 448, "v_scale": 0.004}, 1: {"kv_scale": 0.007}}
    path = with_kv_scales(llama, tmp_path / "scaled", scales)
    runner = make_runner(path, "fp8")
    layers = runner.attn_layers
    assert [layer.kv_scales_from_checkpoint for layer in layers] == [True, True, False]
    assert layers[0].k_scale.item() == pytest.approx(2.5 / 448)
    assert layers[0].v_scale.item() == pytest.approx(0.004)
    assert layers[1].k_scale.item() == layers[1].v_scale.item() == pytest.approx(0.007)
    assert layers[2].k_scale.item() == layers[2].v_scale.item() == 1.0

    written: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    write = runner.attention.write_kv

    def recording(key, value, k_cache, v_cache, metadata, **kw):
        if id(k_cache) not in written:  # the prefill's keys and values
            written[id(k_cache)] = (key.clone(), value.clone(), metadata.slot_mapping.clone())
        write(key, value, k_cache, v_cache, metadata, **kw)

    runner.attention.write_kv = recording
    greedy_logits(runner, steps=1)
    for layer in layers:
        key, value, slots = written[id(layer.k_cache)]
        for cache, new, scale in (
            (layer.k_cache, key, layer.k_scale),
            (layer.v_cache, value, layer.v_scale),
        ):
            stored = cache.view(-1, *cache.shape[2:]).view(torch.uint8)[slots].view(E4M3)
            want = (new / scale).clamp(-448, 448).to(E4M3)
            assert torch.equal(stored.view(torch.uint8), want.view(torch.uint8))
            # Decoded: within half a step of e4m3 (3 mantissa bits; subnormal steps of
            # 2**-9) of the value clamped to the scale's range, scale put back.
            decoded = stored.float() * scale
            expect = new.clamp(-448 * scale, 448 * scale)
            assert ((decoded - expect).abs() <= expect.abs() * 2**-4 + scale * 2**-10).all()
    # Layer 0's v_scale leaves its largest values out of range: stored as +-448, not NaN.
    v_cache, (_, value, slots) = layers[0].v_cache, written[id(layers[0].k_cache)]
    assert value.abs().max() > 448 * 0.004
    assert v_cache.view(-1, *v_cache.shape[2:])[slots].float().abs().max() == 448
    # The scaled run stays near the unscaled fp32 cache.
    exact, _ = greedy_logits(make_runner(llama, "auto"), steps=1)
    scaled, _ = greedy_logits(make_runner(path, "fp8"), steps=1)
    assert (scaled[0] - exact[0]).abs().max() < FIRST_STEP_TOLERANCE["fp8"]


# ---------------------------------------------------------------- refusals


def test_cpu_backend_refuses_fp8_with_a_reason(llama):
    spec = AttentionSpec("cpu", torch.float32, 64, 4, 2, 16, kv_cache_dtype="fp8_e4m3")
    reasons = CpuPagedAttention.validate(spec)
    assert any("KV cache dtype fp8_e4m3" in reason for reason in reasons), reasons
    assert TorchPagedAttention.validate(spec) == []
    with pytest.raises(ConfigError, match="KV cache dtype fp8_e4m3 not supported"):
        make_runner(llama, "fp8", attention_backend="cpu")
    # Chosen automatically, the CPU platform's own backend steps aside for the torch one.
    runner = make_runner(llama, "fp8", attention_backend=None)
    assert runner.attention_choice.chosen == "torch"
    assert "KV cache dtype" in runner.attention_choice.refused.get("cpu", "")


def test_cli_flag_reaches_the_engine_and_the_plugins_explanation(llama):
    from typer.testing import CliRunner

    from tessellm.cli.app import build_app

    def cli(*args: str):
        return CliRunner().invoke(build_app(), list(args))

    model = ["--model", str(llama), "--dtype", "float32"]
    result = cli("plugins", *model, "--device", "cpu", "--kv-cache-dtype", "fp8")
    assert result.exit_code == 0, result.output
    assert "attention: torch" in result.output
    assert "refused cpu: KV cache dtype fp8_e4m3 not supported (supports: auto)" in result.output
    result = cli("generate", "w3 w4", *model, "--no-chat", "--enforce-eager",
                 "--max-tokens", "3", "--kv-cache-dtype", "fp8_e5m2")  # fmt: skip
    assert result.exit_code == 0, result.output
    result = cli("generate", "w3", *model, "--kv-cache-dtype", "int8")
    assert result.exit_code == 2
    assert "unknown kv_cache_dtype 'int8'" in result.output


# ---------------------------------------------------------------- Triton kernels

# (format, Triton's hardware e4m3 conversion): e4m3 both in registers and by bits.
TRITON_FORMATS = [(E4M3, True), (E4M3, False), (E5M2, None)]
FORMAT_IDS = ["e4m3-native", "e4m3-bits", "e5m2"]


def fp8_batch(seqs, fp8: torch.dtype, **shape):
    """A hand-built step (``test_attention_triton.Batch``: NaN wherever no token lives)
    whose caches hold its K/V in ``fp8`` with per-layer scales (``b.k_scale``, ...)."""
    from test_attention_triton import Batch

    b = Batch(seqs, **shape)
    # Different scales for k and v, both using the range (|x| < 5 here): a swapped or
    # missing scale shows. k's is a power of two, so k / k_scale is exact.
    b.k_scale = torch.tensor(2.0**-6, device=b.query.device)
    b.v_scale = torch.tensor(0.02, device=b.query.device)
    limit = torch.finfo(fp8).max
    b.k_cache = (b.k_cache.float() / b.k_scale).clamp(-limit, limit).to(fp8)
    b.v_cache = (b.v_cache.float() / b.v_scale).clamp(-limit, limit).to(fp8)
    return b


def triton_backend(spec: AttentionSpec, native: bool | None):
    from tessellm_attention_triton.backend import TritonPagedAttention

    backend = TritonPagedAttention(spec)
    backend.fp8_native = native
    return backend


@pytest.mark.parametrize("fp8", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_triton_write_kv_stores_the_reference_bytes(fp8):
    from test_attention_triton import MIXED

    b = fp8_batch(MIXED, fp8, block_size=16, num_heads=4, num_kv_heads=2, head_size=64)
    slots = b.metadata.slot_mapping.clone()
    slots[3] = -1  # a padding token: nothing written
    b.metadata.slot_mapping = slots
    g = torch.Generator().manual_seed(3)
    key, value = (3 * torch.randn(2, len(slots), 2, 64, generator=g)).to(b.query.device)
    key[0, 0, 0] = 1e4  # beyond the range: clamped, not NaN
    # Halfway between two fp8 values (ties to even, a carry into the exponent), subnormals.
    codes = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    codes = codes[codes.isfinite()].unique()
    ties = (codes[1:] + codes[:-1]) / 2
    middle = len(ties) // 2
    key[1, :2] = (ties[middle - 64 : middle + 64] * b.k_scale.cpu()).view(2, 64).to(key.device)
    scales = {"k_scale": b.k_scale, "v_scale": b.v_scale}
    want = [b.k_cache.clone(), b.v_cache.clone()]
    TorchPagedAttention(b.spec).write_kv(key, value, *want, b.metadata, **scales)
    got = [b.k_cache.clone(), b.v_cache.clone()]
    triton_backend(b.spec, None).write_kv(key, value, *got, b.metadata, **scales)
    for cache, expect in zip(got, want, strict=True):
        assert torch.equal(cache.view(torch.uint8), expect.view(torch.uint8))
    assert got[0].view(-1, 2, 64)[slots[0], 0, 0].float() == torch.finfo(fp8).max


@pytest.mark.parametrize(("fp8", "native"), TRITON_FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize(
    ("seqs", "feature"),
    [("MIXED", {"sliding_window": 13}), ("DECODE_LONG", {"logits_soft_cap": 1.5})],
    ids=["mixed", "split-decode"],
)
def test_triton_attention_over_fp8_matches_the_reference(fp8, native, seqs, feature):
    import test_attention_triton

    b = fp8_batch(
        getattr(test_attention_triton, seqs),
        fp8,
        block_size=16,
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
    )
    kw = {"scale": 0.125, "k_scale": b.k_scale, "v_scale": b.v_scale, **feature}
    want = TorchPagedAttention(b.spec).forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw)
    backend = triton_backend(b.spec, native)
    backend.prepare(b.metadata)
    if seqs == "DECODE_LONG":
        assert b.metadata.extra["triton_attention"].num_splits > 1
    got = backend.forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_triton_attention_over_fp8_in_half_precision():
    from test_attention_triton import MIXED

    b = fp8_batch(
        MIXED, E4M3, block_size=16, num_heads=4, num_kv_heads=2, head_size=64,
        dtype=torch.float16,
    )  # fmt: skip
    kw = {"scale": 0.125, "k_scale": b.k_scale, "v_scale": b.v_scale}
    want = TorchPagedAttention(b.spec).forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw)
    got = triton_backend(b.spec, False).forward(b.query, b.k_cache, b.v_cache, b.metadata, **kw)
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


def test_triton_backend_declares_fp8_caches():
    from tessellm_attention_triton.backend import TritonPagedAttention

    for kv in ("auto", "fp8_e4m3", "fp8_e5m2"):
        spec = AttentionSpec("cuda", torch.bfloat16, 128, 32, 8, 16, kv_cache_dtype=kv)
        assert TritonPagedAttention.validate(spec) == []
