"""GGUF files and blocks for the gguf package's tests, built with the ``gguf`` package.

``random_blocks`` makes rows of any kept type by its documented block layout (random
codes and scales; fp16 scale fields set to finite values), since ``gguf.quants`` can
quantize only the simple types. ``write_tiny_llama`` writes a tiny random Llama as
llama.cpp's converter does (Q/K rows permuted, tensors quantized with ``gguf.quants``)
with a byte-level BPE tokenizer, so transformers' GGUF loader reads config, tokenizer and
weights back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quantize

QT = GGMLQuantizationType

# Byte offsets of the fp16 fields in each block: (scale fields, min/offset fields).
_F16_FIELDS = {
    QT.Q4_0: ((0,), ()),
    QT.Q4_1: ((0,), (2,)),
    QT.Q5_0: ((0,), ()),
    QT.Q5_1: ((0,), (2,)),
    QT.Q8_0: ((0,), ()),
    QT.Q4_K: ((0,), (2,)),
    QT.Q5_K: ((0,), (2,)),
    QT.Q6_K: ((208,), ()),
}


def random_blocks(qtype: int, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """``[rows, bytes per row]`` uint8 of ``qtype`` blocks: random codes, sub-block scales
    and mins (all bit patterns are valid), fp16 scales in [1e-3, 2e-2) and fp16 offsets in
    (-2e-2, 2e-2)."""
    block, size = GGML_QUANT_SIZES[QT(qtype)]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales, offsets = _F16_FIELDS[QT(qtype)]
    for at in scales:
        d = rng.uniform(1e-3, 2e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    for at in offsets:
        m = rng.uniform(-2e-2, 2e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = m.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 byte values)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars, strict=True))


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (transformers' loader reverses it)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# GGUF names of a Llama block's tensors, by the HF module name.
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_llama(
    path: Path,
    types: dict[str, int],
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    std: float = 0.08,
    architecture: str = "llama",
) -> Path:
    """A random Llama GGUF (``architecture="qwen2"``: a Qwen2 one, with q/k/v biases and
    no Q/K row permutation). ``types`` maps GGUF tensor names (``blk.0.attn_q``, or a kind
    ``attn_q`` for every block, ``token_embd``, ``output``) to their quantization type;
    unnamed matrices are Q4_0, norms F32. Weights are normal with ``std`` (wide, so that
    logits are peaked and rounding cannot flip a greedy choice)."""
    rng = np.random.default_rng(seed)
    byte_chars = _bytes_to_unicode()
    merges = ["Ġ t", "h e", "Ġ a"]
    tokens = [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in merges]
    tokens += ["<s>", "</s>"]
    vocab = len(tokens)
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), architecture)
    qwen = architecture == "qwen2"
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)

    def matrix(name: str, rows: int, cols: int, permute_heads: int = 0) -> None:
        w = rng.normal(0.0, std, (rows, cols)).astype(np.float32)
        if permute_heads:
            w = _permute(w, permute_heads)
        kind = name.split(".")[-1]
        qtype = QT(types.get(name, types.get(kind, QT.Q4_0)))
        data = quantize(w, qtype)
        raw = {"raw_dtype": qtype} if qtype not in (QT.F32, QT.F16) else {}
        writer.add_tensor(f"{name}.weight", data, **raw)

    matrix("token_embd", vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}"
        matrix(f"{b}.attn_q", hidden, hidden, permute_heads=0 if qwen else heads)
        matrix(f"{b}.attn_k", kv_heads * head_dim, hidden, permute_heads=0 if qwen else kv_heads)
        matrix(f"{b}.attn_v", kv_heads * head_dim, hidden)
        matrix(f"{b}.attn_output", hidden, hidden)
        matrix(f"{b}.ffn_gate", intermediate, hidden)
        matrix(f"{b}.ffn_up", intermediate, hidden)
        matrix(f"{b}.ffn_down", hidden, intermediate)
        if qwen:
            for name, rows in (("attn_q", hidden), ("attn_k", kv_heads * head_dim)):
                writer.add_tensor(f"{b}.{name}.bias", rng.normal(0, 0.1, rows).astype(np.float32))
            bias = rng.normal(0, 0.1, kv_heads * head_dim).astype(np.float32)
            writer.add_tensor(f"{b}.attn_v.bias", bias)
        for norm in ("attn_norm", "ffn_norm"):
            weight = 1 + rng.normal(0, 0.1, hidden).astype(np.float32)
            writer.add_tensor(f"{b}.{norm}.weight", weight)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    matrix("output", vocab, hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
