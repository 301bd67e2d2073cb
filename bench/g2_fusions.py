"""Batch-1 decode fusions for issue 6 target G2, A/B-measured in one process on a CUDA GPU.

``gemv``: the projections that take a fused neighbour, at one token, each call reading a
different copy of the weight inside one CUDA graph (as ``g2_levers.py gemv``): q/k/v with
add+RMSNorm before it, gate/up with add+RMSNorm before and SiLU-and-mul after, as
separate kernels (norm, GEMV, SiLU) and as the persistent fused kernel (``norm_gemv``) in
several shapes; the plain GEMV alone (q/k/v) is the floor the fused one should reach.

``decode``: one engine (``random:llama-3-8b``, the platform's default quantization, the
Triton GEMV), one 512-token request decoded for 256 tokens per lever set. Each set binds a
fused-op table (``bind_fused_ops``) and picks where split-decode partials are merged, then
the decode graphs are recaptured; reported as in ``g2_levers.py decode``: step wall time,
captured forward (CUDA events), kernel groups and counts from a CUDA trace, the roofline.

    python bench/g2_fusions.py gemv decode --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tessellm.config import EngineArgs
from tessellm.engine.llm_engine import LLMEngine
from tessellm.interfaces.ops import bind_fused_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuda_steps import (
    copy_tb_per_s,
    events_ms,
    greedy,
    kernel_breakdown,
    warmed_up_prompt,
)
from g2_levers import generate_timed, graph_us_per_call, step_bytes

BEFORE = ["add_rms_norm", "rms_norm", "silu_and_mul", "rotary_neox"]  # the ops until now
# name: (fused-op names, merge split partials in the decode kernel, LinearFusions kwargs)
LEVER_SETS: dict[str, tuple[list[str] | None, bool, dict]] = {
    "before": (BEFORE, False, {}),
    "rotary_kv": ([*BEFORE, "rotary_neox_write_kv"], False, {}),
    "merge_last_split": (BEFORE, True, {}),
    "silu_gemv": ([*BEFORE, "linear_silu_and_mul"], False, {}),
    "norm_gemv": ([*BEFORE, "rms_norm_linear"], False, {}),
    "norm_silu_gemv": ([*BEFORE, "rms_norm_linear", "linear_silu_and_mul"], False, {}),
    "all": (None, True, {}),
    # the persistent tiles that won the micro-benchmark in this run (filled in by main)
    "all_best_tiles": (None, True, {}),
    "defaults": (None, False, {}),  # every fused op, split merge by its own kernel
}
# (block_n, num_warps, programs_per_sm) of the persistent fused GEMV
PERSISTENT = [(2, 8, 4), (4, 8, 4), (2, 8, 2), (1, 8, 8), (2, 4, 8), (4, 8, 2), (1, 8, 4)]


@torch.inference_mode()
def gemv_table(copy_tb: float) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = _gemv_rows("qkv", 6144, False, copy_tb, gen)
    return rows + _gemv_rows("gate_up", 28672, True, copy_tb, gen)


def _gemv_rows(name, n, silu, copy_tb, gen) -> list[dict]:
    from tessellm_triton_kernels.activation import silu_and_mul
    from tessellm_triton_kernels.gemv import gemv
    from tessellm_triton_kernels.norm import add_rms_norm
    from tessellm_triton_kernels.norm_gemv import PersistentGemvConfig, norm_gemv

    k = 4096
    nbytes = n * k * 2
    copies = max(3, -(-1_500_000_000 // nbytes))  # ~1.5 GB: weights stream from HBM
    ws = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for _ in range(copies)
    ]
    x, res = (torch.randn(1, k, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in "xr")
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=gen) + 0.5

    def unfused(w):
        h, _ = add_rms_norm(x, res, g, 1e-5, 0.0)
        y = gemv(h, w)
        return silu_and_mul(y) if silu else y

    def persistent(w, cfg):
        return norm_gemv(
            x, w, residual=res, norm_weight=g, eps=1e-5, silu_and_mul=silu, config=cfg
        )[0]

    variants = {"unfused": unfused}
    if not silu:
        variants["gemv_only"] = lambda w: gemv(x, w)
    for c in PERSISTENT:
        cfg = PersistentGemvConfig(*c)
        variants[f"persistent_n{c[0]}_w{c[1]}_p{c[2]}"] = lambda w, cfg=cfg: persistent(w, cfg)
    ref = unfused(ws[0]).double()
    rows = []
    for vname, fn in variants.items():
        try:
            err = float((fn(ws[0]).double() - ref).norm() / ref.norm())
            us = graph_us_per_call([lambda w=w, fn=fn: fn(w) for w in ws])
        except Exception as exc:  # a tile shape that does not compile: record, go on
            rows.append({"proj": name, "variant": vname, "error": repr(exc)[:300]})
            continue
        tb = nbytes / (us * 1e-6) / 1e12
        rows.append(
            {"proj": name, "variant": vname, "us": round(us, 2),
             "of_copy": round(tb / copy_tb, 3), "rel_err_vs_unfused": err}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    del ws
    torch.cuda.empty_cache()
    return rows


@torch.inference_mode()
def decode_levers(model: str, prompt_len: int, new_tokens: int, sets: list[str]) -> dict:
    from tessellm_triton_kernels.linear_ops import LinearFusions
    from tessellm_triton_kernels.ops import triton_fused_ops

    engine = LLMEngine(EngineArgs(model=model, max_model_len=1024, max_num_seqs=8))
    runner = engine.executor.runner
    prompt = warmed_up_prompt(engine, prompt_len, new_tokens)
    out: dict = {
        "quantization": getattr(runner, "quantization", None),
        "bytes_per_step": step_bytes(runner, prompt_len, new_tokens),
        "sets": {},
    }
    tokens: dict[str, list[int]] = {}
    for name in sets:
        names, merge, fusion_kwargs = LEVER_SETS[name]
        fusions = LinearFusions(**fusion_kwargs)
        out.setdefault("fusions", {})[name] = repr(fusions)
        bind_fused_ops(runner.model, triton_fused_ops(names, fusions))
        runner.attention.merge_in_decode = merge
        runner.graph_runner.capture()
        graph, hidden = runner.graph_runner.graphs[1]
        row = generate_timed(engine, prompt, new_tokens)
        row["graph_forward_ms"] = events_ms(graph.replay, 50)
        row["lm_head_ms"] = events_ms(lambda h=hidden, m=runner.model: m.compute_logits(h[:1]))
        kernels = kernel_breakdown(graph.replay, reps=10)
        row["kernels_us"] = {k: round(v, 1) for k, v in kernels.items() if k != "top"}
        row["top_kernels_us"] = {k: round(v, 1) for k, v in kernels["top"].items()}
        out["sets"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if "kernels" not in k}), flush=True)
        tokens[name] = _greedy_tokens(engine, prompt, 32)
    # bf16 fusions round differently in the last bits: how soon greedy paths part.
    base = tokens[sets[0]]
    out["tokens_equal_to_first_set"] = {
        name: next((i for i, (a, b) in enumerate(zip(base, t, strict=True)) if a != b), len(t))
        for name, t in tokens.items()
    }
    engine.shutdown()
    return out


def _best_persistent(rows: list[dict]) -> dict:
    """LinearFusions kwargs with the fastest persistent tiles for q/k/v and gate/up."""
    from tessellm_triton_kernels.norm_gemv import PersistentGemvConfig

    best = {}
    for proj, key in (("qkv", "norm_config"), ("gate_up", "silu_config")):
        timed = [r for r in rows if r["proj"] == proj and "us" in r]
        timed = [r for r in timed if r["variant"].startswith("persistent_")]
        if timed:
            fastest = min(timed, key=lambda r: r["us"])["variant"]
            n, w, p = (int(part[1:]) for part in fastest.split("_")[1:])
            best[key] = PersistentGemvConfig(block_n=n, num_warps=w, programs_per_sm=p)
    return best


def _greedy_tokens(engine: LLMEngine, prompt: list[int], n: int) -> list[int]:
    engine.add_request("tokens", prompt, greedy(n))
    ids: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                ids = list(output.outputs[0].token_ids)
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="+", choices=["gemv", "decode"])
    parser.add_argument("--model", default="random:llama-3-8b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--sets", nargs="+", default=list(LEVER_SETS), choices=LEVER_SETS)
    parser.add_argument("--json")
    args = parser.parse_args()
    copy_tb = copy_tb_per_s()
    result: dict = {"device": torch.cuda.get_device_name(0), "copy_tb_per_s": copy_tb}
    print(f"{result['device']}: copy {copy_tb:.3f} TB/s", flush=True)

    def save() -> None:  # after each part: a later failure keeps what was measured
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    if "gemv" in args.what:
        result["gemv"] = gemv_table(copy_tb)
        save()
        LEVER_SETS["all_best_tiles"][2].update(_best_persistent(result["gemv"]))
    if "decode" in args.what:
        res = decode_levers(args.model, args.prompt_len, args.new_tokens, args.sets)
        res["roofline_tok_s"] = copy_tb * 1e12 / res["bytes_per_step"]
        for row in res["sets"].values():
            row["roofline_fraction"] = row["decode_tok_s"] / res["roofline_tok_s"]
        result["decode"] = res
        save()
    print("== summary", result["device"], f"copy {copy_tb:.3f} TB/s")
    for row in result.get("gemv", []):
        if "us" in row:
            print(f"gemv {row['proj']:8s} {row['variant']:22s} {row['us']:7.2f} us"
                  f" {row['of_copy']:.3f} err {row['rel_err_vs_unfused']:.1e}")  # fmt: skip
        else:
            print(f"gemv {row['proj']:8s} {row['variant']:22s} {row['error'][:120]}")
    res = result.get("decode")
    if res:
        print(f"decode roofline {res['roofline_tok_s']:.1f} tok/s")
        for name, row in res["sets"].items():
            k = row["kernels_us"]
            count = sum(v for key, v in k.items() if key.endswith("_count"))
            print(
                f"  {name:17s} step {row['step_wall_ms']:.3f} graph {row['graph_forward_ms']:.3f}"
                f" lm {row['lm_head_ms']:.3f} mm {k.get('matmul', 0):.0f} attn"
                f" {k.get('attention', 0):.0f} norm {k.get('norm', 0):.0f} rot"
                f" {k.get('rotary', 0):.0f} kv {k.get('write_kv', 0):.0f} silu"
                f" {k.get('silu_and_mul', 0):.0f} us, {count:.0f} kernels,"
                f" {row['decode_tok_s']:.1f} tok/s {row['roofline_fraction']:.3f}"
            )
        print("  greedy tokens equal to the first set for:", res["tokens_equal_to_first_set"])


if __name__ == "__main__":
    main()
