"""The reference compressor: what a compressed-tensors checkpoint stores for one dense
linear weight, computed with the compressed-tensors library as llm-compressor does it.

llm-compressor's min-max observer takes each scale's range from the weight (per tensor,
per output channel or per group of inputs); the library turns ranges into scales and zero
points (``calculate_qparams``) and its compressor for the format quantizes and packs
(``BaseCompressor.compress``: ``weight_packed`` / ``weight_scale`` / ``weight_shape``
/ ``weight_zero_point``, or ``weight`` / ``weight_scale``). Static activation scales
come from calibration data, which a reference for one weight does not have: it stores
the scale of activations within ``+-STATIC_INPUT_RANGE``.
"""

from __future__ import annotations

from typing import Any

import torch

# The activation range a static input scale is set for by the reference compressor (the
# conformance kit's and the tests' activations are unit Gaussians: no value reaches it).
STATIC_INPUT_RANGE = 8.0


def observed_range(weight: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``weight [N, K]`` per scale of ``args``' strategy, in the weight's
    dtype: ``[1]`` per tensor, ``[N, 1]`` per channel, ``[N, K / group]`` per group."""
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        groups = weight.unflatten(-1, (weight.shape[-1] // args.group_size, args.group_size))
        return groups.amin(dim=-1), groups.amax(dim=-1)
    if strategy == "channel":
        return weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    if strategy == "tensor":
        return weight.amin().reshape(1), weight.amax().reshape(1)
    raise ValueError(f"no reference observer for weight strategy {strategy!r}")


def compress_linear(weight: torch.Tensor, scheme: Any, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors a compressed-tensors checkpoint holds for the dense ``[N, K]`` ``weight``
    quantized with ``scheme`` (the library's ``QuantizationScheme``) and stored as ``fmt``.

    Grouped weights whose K is not a whole number of groups (which llm-compressor cannot
    write) are stored as if zero-padded to whole groups, the packed words cut back to K:
    the last group is partial, as GPTQ's is."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    out_features, in_features = weight.shape
    padded = weight.detach()
    group = args.group_size if str(getattr(args.strategy, "value", args.strategy)) == "group" else 0
    if group and in_features % group:
        padded = torch.nn.functional.pad(padded, (0, group - in_features % group))
    low, high = observed_range(padded, args)
    scale, zero_point = calculate_qparams(low, high, args)
    state = {"weight": padded, "weight_scale": scale, "weight_zero_point": zero_point}
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors = dict(compressor.compress(state, scheme))
    if padded.shape != weight.shape:
        words = -(-in_features * args.num_bits // 32)
        tensors["weight_packed"] = tensors["weight_packed"][:, :words].contiguous()
        tensors["weight_shape"] = torch.tensor([out_features, in_features])
    acts = scheme.input_activations
    if acts is not None and not acts.dynamic:
        bound = torch.tensor([STATIC_INPUT_RANGE], dtype=torch.float32)
        tensors["input_scale"] = calculate_qparams(-bound, bound, acts)[0]
    return tensors
