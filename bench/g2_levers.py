"""Batch-1 decode levers for issue 6 target G2, measured in one process on a CUDA GPU.

``gemv``: each Llama-3-8B projection at one token (qkv, o, gate_up, down), cuBLAS
(``F.linear``, ``W @ x``) against the Triton GEMV in several tile configurations. Every
call reads a different copy of the weight (together far more than L2, as in the model),
all inside one CUDA graph; reported as microseconds per call and the fraction of the copy
bandwidth measured in the same run. Each Triton result is checked against an fp32 product.

``decode``: one 512-token request decoded for 256 tokens at batch 1, once per
quantization method (``none``: cuBLAS; ``unquantized_gemv``: the Triton GEMV), and within
each engine once per decode-attention variant (split heuristic, keys per tile, warps;
the graphs are recaptured for each). Reports the captured forward (graph replay, CUDA
events), its kernels by group, the step wall time split into ``execute`` (inputs, replay,
LM head, sampling and the sync on the token) and the rest of ``LLMEngine.step``, and the
roofline: bytes a step must read over the copy bandwidth.

    python bench/g2_levers.py gemv decode --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_steps import (
    copy_tb_per_s,
    events_ms,
    greedy,
    kernel_breakdown,
    warmed_up_prompt,
)

SHAPES = {  # (out_features, in_features) of Llama-3-8B's projections, one token
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
}
# (block_n, block_k, num_warps, num_stages)
GEMV_CONFIGS = [
    (4, 1024, 4, 1),
    (4, 2048, 4, 1),
    (8, 512, 4, 1),
    (8, 1024, 4, 1),
    (8, 1024, 8, 1),
    (8, 2048, 8, 1),
    (16, 512, 4, 1),
    (16, 512, 8, 1),
    (16, 1024, 8, 1),
    (32, 256, 4, 1),
    (8, 512, 4, 3),
    (8, 1024, 4, 2),
]
# name: (min_split_tokens, decode_tile_n, decode_num_warps)
ATTENTION_VARIANTS = {
    "split512_t64_w4": (512, 64, 4),
    "split64_t64_w4": (64, 64, 4),
    "split32_t32_w4": (32, 32, 4),
    "split16_t16_w4": (16, 16, 4),
    "split32_t32_w2": (32, 32, 2),
    "split64_t64_w8": (64, 64, 8),
}


def graph_us_per_call(calls, reps: int = 20) -> float:
    """Median microseconds per call of ``calls`` (a list of thunks) replayed as one graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return events_ms(graph.replay, reps) * 1e3 / len(calls)


@torch.inference_mode()
def gemv_table(copy_tb: float) -> list[dict]:
    from tessellm_triton_kernels.gemv import GemvConfig, gemv

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(3, -(-1_500_000_000 // nbytes))  # ~1.5 GB: weights stream from HBM
        ws = [
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            for _ in range(copies)
        ]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = (x.double() @ ws[0].double().T).float()
        variants = {
            "cublas_linear": lambda w, x=x: F.linear(x, w),
            "cublas_w_at_x": lambda w, x=x: (w @ x.T).T,
        }
        for bn, bk, nw, ns in GEMV_CONFIGS:
            cfg = GemvConfig(bn, bk, nw, ns)
            variants[f"triton_n{bn}_k{bk}_w{nw}_s{ns}"] = lambda w, x=x, cfg=cfg: gemv(
                x, w, None, cfg
            )
        for vname, fn in variants.items():
            try:
                out = fn(ws[0]).float()
                err = float((out - ref).norm() / ref.norm())
                us = graph_us_per_call([lambda w=w, fn=fn: fn(w) for w in ws])
            except Exception as exc:  # a config that does not compile: record, go on
                rows.append({"proj": name, "variant": vname, "error": repr(exc)[:200]})
                continue
            tb = nbytes / (us * 1e-6) / 1e12
            rows.append(
                {
                    "proj": name,
                    "variant": vname,
                    "us": round(us, 2),
                    "of_copy": round(tb / copy_tb, 3),
                    "rel_err": err,
                }
            )
        del ws
        torch.cuda.empty_cache()
    return rows


def step_bytes(runner, prompt_len: int, new_tokens: int) -> int:
    """Every weight but the embedding table, plus the KV cache at the mean context."""
    tied = bool(getattr(runner.config, "tie_word_embeddings", False))
    weights = sum(
        p.numel() * p.element_size()
        for name, p in runner.model.named_parameters()
        if tied or "embed_tokens" not in name
    )
    context = prompt_len + new_tokens // 2
    return weights + runner.bytes_per_block() * context // runner.block_size


def rotary_table_bytes(model) -> int:
    seen = {}
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name.endswith((".cos", ".sin")):
            seen[buf.data_ptr()] = buf.numel() * buf.element_size()
    return sum(seen.values())


@torch.inference_mode()
def generate_timed(engine: LLMEngine, prompt: list[int], new_tokens: int) -> dict:
    """Median step wall time of a batch-1 generation, and of the runner's part of it:
    ``execute`` (synchronous), or ``launch`` (queueing the step) where the runner has it."""
    runner = engine.executor.runner
    hook = "launch" if hasattr(runner, "launch") else "execute"
    inner = getattr(runner, hook)
    inner_s: list[float] = []

    def timed(*args, **kwargs):  # launch also takes the previous step (schedule-ahead)
        t0 = time.perf_counter()
        result = inner(*args, **kwargs)
        inner_s.append(time.perf_counter() - t0)
        return result

    setattr(runner, hook, timed)  # a timing wrapper on this bench's own engine
    walls = []
    engine.add_request("r", prompt, greedy(new_tokens))
    try:
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            walls.append(time.perf_counter() - t0)
    finally:
        delattr(runner, hook)  # back to the class's method
    step = statistics.median(walls[1:])  # the first step is the prefill
    inner_ms = statistics.median(inner_s[1:]) * 1e3 if len(inner_s) > 1 else float("nan")
    return {"step_wall_ms": step * 1e3, f"{hook}_ms": inner_ms, "decode_tok_s": 1 / step}


@torch.inference_mode()
def decode_variants(
    model: str, prompt_len: int, new_tokens: int, quant: str | None, variants: list[str]
) -> dict:
    args = EngineArgs(
        model=model,
        max_model_len=1024,
        max_num_seqs=8,
        quantization=None if quant == "default" else quant,  # default: the platform's pick
    )
    engine = LLMEngine(args)
    runner = engine.executor.runner
    prompt = warmed_up_prompt(engine, prompt_len, new_tokens)
    out: dict = {
        "quantization": getattr(runner, "quantization", quant),
        "bytes_per_step": step_bytes(runner, prompt_len, new_tokens),
        "rotary_table_bytes": rotary_table_bytes(runner.model),
        "variants": {},
    }
    attention = runner.attention
    for name in variants:
        min_split, tile_n, warps = ATTENTION_VARIANTS[name]
        attention.min_split_tokens = min_split
        attention.decode_tile_n = tile_n
        attention.decode_num_warps = warps
        runner.graph_runner.capture()
        graph, hidden = runner.graph_runner.graphs[1]
        row = generate_timed(engine, prompt, new_tokens)
        row["graph_forward_ms"] = events_ms(graph.replay, 50)
        model = runner.model
        row["lm_head_ms"] = events_ms(lambda h=hidden, m=model: m.compute_logits(h[:1]))
        kernels = kernel_breakdown(graph.replay, reps=10)
        row["kernels_us"] = {k: round(v, 1) for k, v in kernels.items() if k != "top"}
        row["top_kernels_us"] = {k: round(v, 1) for k, v in kernels["top"].items()}
        out["variants"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if "kernels" not in k}), flush=True)
    engine.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="+", choices=["gemv", "decode"])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--quantization",
        nargs="+",
        default=["none", "unquantized_gemv"],
        help="methods to compare; 'default' lets the platform choose",
    )
    parser.add_argument(
        "--attention", nargs="+", default=list(ATTENTION_VARIANTS), choices=ATTENTION_VARIANTS
    )
    parser.add_argument(
        "--baseline-attention",
        type=int,
        default=2,
        help="with quantization 'none', run only the first N attention variants",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    copy_tb = copy_tb_per_s()
    result: dict = {"device": torch.cuda.get_device_name(0), "copy_tb_per_s": copy_tb}
    print(f"{result['device']}: copy {copy_tb:.3f} TB/s", flush=True)
    if "gemv" in args.what:
        result["gemv"] = gemv_table(copy_tb)
        for row in result["gemv"]:
            print(json.dumps(row), flush=True)
    if "decode" in args.what:
        result["decode"] = []
        for quant in args.quantization:
            variants = args.attention
            if quant == "none":
                variants = variants[: args.baseline_attention]
            res = decode_variants(args.model, args.prompt_len, args.new_tokens, quant, variants)
            floor_ms = res["bytes_per_step"] / (copy_tb * 1e12) * 1e3
            res["roofline_tok_s"] = 1e3 / floor_ms
            for row in res["variants"].values():
                row["roofline_fraction"] = row["decode_tok_s"] / res["roofline_tok_s"]
            result["decode"].append(res)
            if args.json:  # after each engine: a later failure keeps what was measured
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print("== summary", result["device"], f"copy {copy_tb:.3f} TB/s")
    for row in result.get("gemv", []):
        if "us" in row:
            us, frac = row["us"], row["of_copy"]
            print(f"gemv {row['proj']:8s} {row['variant']:28s} {us:7.2f} us {frac:.3f}")
    for res in result.get("decode", []):
        print(f"decode quant={res['quantization']} roofline {res['roofline_tok_s']:.1f} tok/s")
        for name, row in res["variants"].items():
            print(
                f"  {name:18s} step {row['step_wall_ms']:.3f} ms"
                f" runner {row.get('execute_ms', row.get('launch_ms', 0)):.3f}"
                f" graph {row['graph_forward_ms']:.3f} lm {row['lm_head_ms']:.3f}"
                f" attn {row['kernels_us'].get('attention', 0):.0f}us"
                f" mm {row['kernels_us'].get('matmul', 0):.0f}us"
                f" {row['decode_tok_s']:.1f} tok/s {row['roofline_fraction']:.3f}"
            )


if __name__ == "__main__":
    main()
