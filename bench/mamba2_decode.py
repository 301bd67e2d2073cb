"""Decode throughput of a Mamba2 shape at batch 64: tessellm against transformers'
``generate`` (its torch path) on the same device, random weights of the mamba2-130m
shape (768 wide, 24 layers, 24 heads of 64, d_state 128; ``--layers`` fewer of them
where the baseline is too slow to wait for), fp32.

Decode time is the time of ``max_new_tokens = 1 + N`` minus that of ``1`` (the prompt
and the first token), both measured the same way for both engines, so the prompt's
cost cancels out. Greedy tokens are compared too.

    python bench/mamba2_decode.py [--batch 64] [--prompt 32] [--new 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tessellm import LLM, SamplingParams
from tessellm.testing.models import save_tiny_model


def mamba2_130m_config(layers: int = 24):
    from transformers import Mamba2Config

    config = Mamba2Config(
        vocab_size=50288,
        hidden_size=768,
        num_hidden_layers=layers,
        expand=2,
        num_heads=24,
        head_dim=64,
        n_groups=1,
        state_size=128,
        conv_kernel=4,
        chunk_size=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config.architectures = ["Mamba2ForCausalLM"]
    return config


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=24)  # fewer: the same layers, faster
    args = parser.parse_args()
    torch.manual_seed(0)
    prompts = torch.randint(3, 50000, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_model(mamba2_130m_config(args.layers), Path(tmp) / "mamba2")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device)
        hf.eval()
        ids = prompts.to(args.device)

        def hf_run(n: int) -> torch.Tensor:
            with torch.inference_mode():
                return hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
                )

        hf_run(2)  # warm-up
        print("hf warm", flush=True)
        hf_first = timed(lambda: hf_run(1))
        hf_all = timed(lambda: hf_run(1 + args.new))
        hf_tokens = hf_run(1 + args.new)[:, args.prompt :].tolist()

        llm = LLM(
            model=str(path),
            dtype="float32",
            device=args.device,
            max_num_seqs=args.batch,
            enforce_eager=True,
            seed=0,
        )
        inputs = [{"prompt_token_ids": p} for p in prompts.tolist()]

        def ours(n: int) -> list[list[int]]:
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params)]

        print("hf done", hf_first, hf_all, flush=True)
        ours(2)
        our_first = timed(lambda: ours(1))
        our_all = timed(lambda: ours(1 + args.new))
        our_tokens = ours(1 + args.new)
        llm.engine.shutdown()
    decoded = args.batch * args.new
    result = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "layers": args.layers,
        "batch": args.batch,
        "prompt": args.prompt,
        "new": args.new,
        "hf_decode_tok_s": round(decoded / (hf_all - hf_first), 1),
        "tessellm_decode_tok_s": round(decoded / (our_all - our_first), 1),
        "hf_prompt_plus_first_s": round(hf_first, 2),
        "tessellm_prompt_plus_first_s": round(our_first, 2),
        "sequences_equal": sum(a == b for a, b in zip(our_tokens, hf_tokens, strict=True)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
