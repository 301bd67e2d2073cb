"""The GPTQ and AWQ layouts written out independently of the package: the packing loops
AutoGPTQ (``QuantLinear.pack``) and AutoAWQ (``WQLinear_GEMM.from_linear``) run, and the
plain dequantization ``w[n, k] = (q[k, n] - z[g, n]) * s[g, n]``. The tests build
checkpoints with these and compare the package's results with them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def random_quantized(
    in_features: int,
    out_features: int,
    group_size: int,
    generator: torch.Generator,
    act_order: bool = False,
    sym: bool = False,
) -> dict[str, torch.Tensor]:
    """Random 4-bit ``q [K, N]``, zero points ``[groups, N]``, fp16 scales and ``g_idx``
    (shuffled with ``act_order``: each group's inputs scattered over K)."""
    size = in_features if group_size == -1 else group_size
    groups = -(-in_features // size)
    g_idx = torch.arange(in_features, dtype=torch.int32) // size
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=generator)]
    zeros = torch.randint(0, 16, (groups, out_features), generator=generator, dtype=torch.int32)
    if sym:
        zeros.fill_(8)
    scales = (torch.rand(groups, out_features, generator=generator) * 0.05 + 0.005).half()
    q = torch.randint(0, 16, (in_features, out_features), generator=generator, dtype=torch.int32)
    return {"q": q, "zeros": zeros, "scales": scales, "g_idx": g_idx}


def dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[N, K]`` fp32: ``(q - z[g_idx]) * s[g_idx]``, transposed."""
    g = parts["g_idx"].long()
    w = (parts["q"].float() - parts["zeros"][g].float()) * parts["scales"][g].float()
    return w.t().contiguous()


def _pack_rows(values: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qweight loop: row ``r`` of the result ORs ``values[8 r + j] << 4 j``."""
    v = values.to(torch.int64) & 0xF
    out = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for row in range(out.shape[0]):
        for j in range(8):
            out[row] |= v[8 * row + j] << (4 * j)
    return _as_int32(out)


def _pack_cols(values: torch.Tensor, order_map: list[int]) -> torch.Tensor:
    """Column ``c`` of the result ORs ``values[:, 8 c + order_map[i]] << 4 i``."""
    v = values.to(torch.int64) & 0xF
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for col in range(out.shape[1]):
        for i in range(8):
            out[:, col] |= v[:, 8 * col + order_map[i]] << (4 * i)
    return _as_int32(out)


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words as int32 (numpy's ``astype(np.int32)`` wrap-around)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_checkpoint(parts: dict[str, torch.Tensor], v2: bool = False) -> dict[str, torch.Tensor]:
    """What AutoGPTQ stores: qzeros hold ``z - 1`` (v1), masked to 4 bits; v2 stores ``z``."""
    stored = parts["zeros"] if v2 else (parts["zeros"] - 1) & 0xF
    return {
        "qweight": _pack_rows(parts["q"]),
        "qzeros": _pack_cols(stored, list(range(8))),
        "scales": parts["scales"],
        "g_idx": parts["g_idx"],
    }


def awq_checkpoint(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "qweight": _pack_cols(parts["q"], AWQ_ORDER_MAP),
        "qzeros": _pack_cols(parts["zeros"], AWQ_ORDER_MAP),
        "scales": parts["scales"],
    }


def unpack_gptq(stored: dict[str, torch.Tensor], v2: bool = False) -> dict[str, torch.Tensor]:
    """A GPTQ checkpoint's ``q``/``zeros``/``scales``/``g_idx``, bit by bit."""
    qweight = stored["qweight"].to(torch.int64) & 0xFFFFFFFF
    qzeros = stored["qzeros"].to(torch.int64) & 0xFFFFFFFF
    q = torch.stack([(qweight >> (4 * j)) & 0xF for j in range(8)], dim=1).flatten(0, 1)
    z = torch.stack([(qzeros >> (4 * j)) & 0xF for j in range(8)], dim=2).flatten(1, 2)
    zeros = z if v2 else (z + 1) & 0xF
    return {"q": q, "zeros": zeros, "scales": stored["scales"], "g_idx": stored["g_idx"]}


def unpack_awq(stored: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    def unpack(words: torch.Tensor) -> torch.Tensor:
        words = words.to(torch.int64) & 0xFFFFFFFF
        out = torch.zeros(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
        for col in range(words.shape[1]):
            for i in range(8):
                out[:, 8 * col + AWQ_ORDER_MAP[i]] = (words[:, col] >> (4 * i)) & 0xF
        return out

    q = unpack(stored["qweight"])
    g_idx = torch.arange(q.shape[0], dtype=torch.int32) // group_size
    return {"q": q, "zeros": unpack(stored["qzeros"]), "scales": stored["scales"], "g_idx": g_idx}


def rtn_quantize(weight: torch.Tensor, group_size: int, sym: bool) -> dict[str, torch.Tensor]:
    """Plain round-to-nearest per group of consecutive inputs (GPTQ without its error
    feedback): ``q [K, N]``, zeros, fp16 scales, ``g_idx``."""
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    w = weight.float().view(out_features, -1, size)
    if sym:
        scale = torch.maximum(-w.amin(-1).clamp(max=0) / 8, w.amax(-1).clamp(min=0) / 7)
    else:
        scale = (w.amax(-1) - w.amin(-1)) / 15
    scale = scale.clamp_min(1e-4).half().float()
    zero = torch.full_like(scale, 8) if sym else (-w.amin(-1) / scale).round().clamp(0, 15)
    q = (w / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    return {
        "q": q.view(out_features, in_features).t().to(torch.int32),
        "zeros": zero.t().to(torch.int32),
        "scales": scale.t().half(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // size,
    }


QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_quantized_llama(
    dense_dir: Path,
    out_dir: Path,
    fmt: str,
    group_size: int,
    sym: bool = True,
    act_order: bool = False,
) -> Path:
    """``dense_dir``'s tiny model as a ``fmt`` ("gptq"/"awq") checkpoint in ``out_dir``,
    and its dequantized weights as a dense checkpoint in ``out_dir / "dense"``: every
    decoder linear stored as the format stores it, everything else as is."""
    import shutil

    from safetensors.torch import load_file, save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    dense_out = out_dir / "dense"
    dense_out.mkdir()
    tensors = load_file(dense_dir / "model.safetensors")
    quantized: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(7)
    orders: dict[int, torch.Tensor] = {}  # one act-order per input size, as GPTQ's q/k/v
    for name, tensor in tensors.items():
        stem = name.removesuffix(".weight")
        if not (name.endswith(".weight") and stem.rsplit(".", 1)[-1] in QUANTIZED_LINEARS):
            quantized[name] = dequantized[name] = tensor
            continue
        parts = rtn_quantize(tensor, group_size, sym)
        if act_order:
            k = tensor.shape[1]
            order = orders.setdefault(k, torch.randperm(k, generator=gen))
            # The same groups over shuffled inputs: input order[i] takes group i // G.
            parts = rtn_quantize(tensor[:, order], group_size, sym)
            inverse = torch.argsort(order)
            parts["q"], parts["g_idx"] = parts["q"][inverse], parts["g_idx"][inverse]
        dequantized[name] = dequantize(parts)
        stored = gptq_checkpoint(parts) if fmt == "gptq" else awq_checkpoint(parts)
        for key, value in stored.items():
            quantized[f"{stem}.{key}"] = value.contiguous()
    save_file(quantized, out_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, dense_out / "model.safetensors", metadata={"format": "pt"})
    for item in dense_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, out_dir / item.name)
            shutil.copy(item, dense_out / item.name)
    config = json.loads((dense_dir / "config.json").read_text())
    if fmt == "gptq":
        quant = {"quant_method": "gptq", "bits": 4, "group_size": group_size}
        quant |= {"sym": sym, "desc_act": act_order, "checkpoint_format": "gptq"}
    else:
        quant = {"quant_method": "awq", "bits": 4, "group_size": group_size}
        quant |= {"zero_point": True, "version": "gemm"}
    config["quantization_config"] = quant
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
