"""GPU ceilings and fused-kernel timings, for bench/RESULTS.md (run on a CUDA machine).

1. Copy bandwidth: a large device-to-device copy, counting bytes read plus written.
2. Each fused Triton kernel against the torch code it replaces (the layer's own forward)
   and against ``torch.compile`` of that code, at Llama-3-8B shapes for 1, 256 and 8192
   tokens. Times are medians of CUDA-event timings; "graph" times replay a CUDA graph of
   20 calls, which is how decode steps run, so launch overhead is left out.

    python bench/cuda_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels/triton/src"))

from cuda_steps import events_ms  # noqa: E402

from tessellm.layers.activation import GatedActivation  # noqa: E402
from tessellm.layers.norm import RMSNorm  # noqa: E402
from tessellm.layers.rotary import RotaryEmbedding  # noqa: E402
from tessellm_triton_kernels.ops import triton_fused_ops  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD = 4096, 14336, 32, 8, 128
TOKENS = (1, 256, 8192)


def event_time_ms(fn: Callable[[], object], reps: int = 50) -> float:
    # Five warm-up calls, not one: the first calls of a variant compile it (Triton, compile).
    return events_ms(fn, reps=reps, warmup=5)


def graph_time_us(fn: Callable[[], object], calls: int = 20) -> float:
    """Per-call GPU time inside a captured graph of ``calls`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return event_time_ms(graph.replay, reps=20) * 1e3 / calls


def copy_bandwidth(gib: float = 4.0) -> dict[str, float]:
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = event_time_ms(lambda: dst.copy_(src), reps=20)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_moved": moved, "ms": ms, "tb_per_s": moved / (ms * 1e-3) / 1e12}


class _Rope:
    rope_parameters = {"rope_theta": 500000.0, "rope_type": "default"}


def op_cases(tokens: int, dtype: torch.dtype) -> dict[str, tuple[torch.nn.Module, tuple]]:
    gen = torch.Generator(device="cuda").manual_seed(tokens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    norm = RMSNorm(HIDDEN, 1e-5, dtype).cuda()
    act = GatedActivation("silu")
    rope = RotaryEmbedding(_Rope(), HEAD, 8192).cuda()
    qkv = rand(tokens, (HEADS + 2 * KV_HEADS) * HEAD)
    q = qkv[:, : HEADS * HEAD].view(tokens, HEADS, HEAD)
    k = qkv[:, HEADS * HEAD : (HEADS + KV_HEADS) * HEAD].view(tokens, KV_HEADS, HEAD)
    positions = torch.randint(0, 8192, (tokens,), device="cuda", generator=gen)
    return {
        "add_rms_norm": (norm, (rand(tokens, HIDDEN), rand(tokens, HIDDEN))),
        "silu_and_mul": (act, (rand(tokens, 2 * INTERMEDIATE),)),
        "rotary_neox": (rope, (positions, q, k)),
    }


def bytes_moved(name: str, args: tuple) -> int:
    """The fewest bytes each op must move (inputs read once, outputs written once)."""
    if name == "add_rms_norm":
        return 4 * args[0].numel() * args[0].element_size()  # x, residual in; sum, out
    if name == "silu_and_mul":
        return args[0].numel() * args[0].element_size() * 3 // 2
    q, k = args[1], args[2]
    return 2 * (q.numel() + k.numel()) * q.element_size()


@torch.inference_mode()
def time_ops(dtype: torch.dtype) -> list[dict[str, object]]:
    fused = triton_fused_ops()
    rows = []
    for tokens in TOKENS:
        for name, (module, args) in op_cases(tokens, dtype).items():
            module.fused_ops = None
            reference = module(*args)
            compiled = torch.compile(module.forward, dynamic=False)
            compiled(*args)
            module.fused_ops = fused
            result = module(*args)
            pairs = zip(
                reference if isinstance(reference, tuple) else (reference,),
                result if isinstance(result, tuple) else (result,),
                strict=True,
            )
            err = max(
                ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
                for a, b in pairs
            )
            row: dict[str, object] = {"op": name, "tokens": tokens, "rel_err": err}
            for variant in ("torch", "compile", "triton"):
                module.fused_ops = fused if variant == "triton" else None
                call = compiled if variant == "compile" else module
                fn = functools.partial(call, *args)
                row[f"{variant}_eager_us"] = event_time_ms(fn) * 1e3
                row[f"{variant}_graph_us"] = graph_time_us(fn)
            row["min_bytes"] = bytes_moved(name, args)
            rows.append(row)
            print(
                f"{name:13s} T={tokens:5d}  graph us: torch {row['torch_graph_us']:8.1f}  "
                f"compile {row['compile_graph_us']:8.1f}  triton {row['triton_graph_us']:8.1f}"
                f"  (eager: {row['torch_eager_us']:7.1f} / {row['compile_eager_us']:7.1f} / "
                f"{row['triton_eager_us']:7.1f})  rel.err {err:.1e}",
                flush=True,
            )
    return rows


GEMV_SHAPES = {  # Llama-3-8B's projections (out, in) and its LM head
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}


@torch.inference_mode()
def time_gemv(copy_tb_per_s: float, tokens: int = 1) -> list[dict[str, object]]:
    """Batch-1 projections through torch (cuBLAS): achieved weight-read bandwidth."""
    rows = []
    for name, (out_f, in_f) in GEMV_SHAPES.items():
        # Several weight copies, so the 50-60 MB L2 cannot serve repeated calls.
        weights = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)

        def run(weights=weights, x=x):
            for w in weights:
                torch.nn.functional.linear(x, w)

        us = graph_time_us(run, calls=5) / len(weights)
        tb_s = out_f * in_f * 2 / (us * 1e-6) / 1e12
        rows.append({"proj": name, "us": us, "tb_per_s": tb_s, "of_copy": tb_s / copy_tb_per_s})
        print(f"gemv {name:8s} {us:7.1f} us  {tb_s:.2f} TB/s ({tb_s / copy_tb_per_s:.0%} of copy)")
        del weights
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--gemv-only", action="store_true", help="skip the fused-op timings")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    result: dict[str, object] = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
    }
    result["copy"] = copy_bandwidth()
    print(f"{props.name}: copy {result['copy']['tb_per_s']:.2f} TB/s (read + write)", flush=True)
    result["gemv_bf16"] = time_gemv(result["copy"]["tb_per_s"])
    if not args.gemv_only:
        result["ops_bf16"] = time_ops(torch.bfloat16)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
