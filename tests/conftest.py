"""Shared fixtures: tiny random HF models saved to disk, and HF greedy references."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny test models gain nothing from intra-op threads, and tests start engine subprocesses
# (servers, tensor-parallel workers) that would fight over the same two cores. The CPU
# platform respects OMP_NUM_THREADS, and subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Engines in tests run their CPU decode steps eagerly: compiling one (a C++ build) per test
# model would take most of the suite's time. test_cpu_compiled_decode.py turns it on.
os.environ.setdefault("TESSELLM_CPU_COMPILE", "0")

REPO_ROOT = Path(__file__).resolve().parents[1]


def use_triton_plugins(*plugin_srcs: str) -> None:
    """Module-level set-up of a Triton test file, before it imports any kernel: without a
    GPU the kernels run in Triton's interpreter (read when a kernel is defined); the file
    is skipped without Triton; ``plugin_srcs`` (repo-relative) become importable."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    for src in plugin_srcs:
        if str(REPO_ROOT / src) not in sys.path:
            sys.path.append(str(REPO_ROOT / src))


TEST_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole",
    "1 2 3 4 5 6",
    "The quick brown fox",
    "A",
    "Once upon a time, in a land far far away, there was a small village where",
    "def fibonacci(n):",
]


def live_descendants(pid: int) -> set[int]:
    """Live descendants of ``pid`` (from /proc), multiprocessing's resource tracker aside."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                tracker = b"resource_tracker" in f.read()
        except OSError:
            continue
        if state != "Z" and not tracker:
            parents[int(entry)] = int(ppid)
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def make_tokenizer(path: Path, vocab_size: int):
    """A small word-level tokenizer saved with the model (no hub access needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in TEST_PROMPTS for w in p.replace(",", " ,").split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)
    return fast


def save_tiny_model(config, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Wider weights than the default init give peaked logits, so fp32 rounding differences
    # between two correct implementations cannot flip a greedy argmax.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path, config.vocab_size)
    return path


# Sizes and ids of the tiny Llama-shaped test models (GQA: 4 query heads, 2 KV heads),
# shared by every family whose config takes the Llama field names.
TINY_DECODER = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    config = LlamaConfig(**{**TINY_DECODER, **overrides})
    config.architectures = ["LlamaForCausalLM"]
    return config


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tiny_llama_config(), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_prompt_ids(tiny_llama) -> list[list[int]]:
    """TEST_PROMPTS in the tiny Llama's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return [tok.encode(p) for p in TEST_PROMPTS]


def hf_greedy(
    path: Path, prompt_ids: list[list[int]], max_new_tokens: int, **load_kwargs
) -> list[list[int]]:
    """HF transformers' greedy continuation of each prompt, one at a time (the reference).

    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"`` where
    only the eager path applies soft-capping)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **load_kwargs).eval()
    return [hf_continuation(model, ids, max_new_tokens) for ids in prompt_ids]


def hf_continuation(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """A loaded HF model's greedy continuation of one prompt, never stopping at EOS."""
    inp = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():
        gen = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,  # one unpadded prompt: never used
        )
    return gen[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def tiny_server(tiny_llama, tmp_path_factory):
    """One real ``tessellm serve`` process on the tiny Llama, shared by the server tests."""
    from server_harness import start_server

    server = start_server(
        tiny_llama, tmp_path_factory.mktemp("server-logs"), "--max-num-seqs", "64"
    )
    yield server
    server.stop()
