"""``check_quantization_method``: linear layers built, loaded and processed through a
registered method, against a dense matmul of the same weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessellm.interfaces.quantization import QuantizationMethod
from tessellm.testing.conformance.result import Checker, CheckResult

# Allowed error of each output row: ||y - y_ref|| <= tol * ||y_ref||, against float64 from
# the same (rounded) inputs. 1% admits 8-bit per-channel rounding of the test weights
# (~0.4%) and the run dtype's own rounding; layout, scale or bias mistakes are far larger.
ROW_TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-2,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}
# (in_features, out_features): multiples of 32 and 16, as group-wise kernels need, and
# one whose input is not a whole 128-group.
SHAPES = ((128, 64), (256, 96), (96, 32))
BATCHES = (1, 5, 40)
GROUP = 128  # the test weights' quantization group along the input


def grid_weight(out_features: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Weights on a 4-bit grid, ``(q - 8) * scale`` with one power-of-two scale per row and
    group of 128 inputs, and every 32 inputs touching both ends of the grid: 4-bit
    group-wise formats with groups of 32, 64 or 128 hold them exactly (in any run dtype),
    so a lossless-on-grid method is checked as tightly as a dense one."""
    groups = -(-in_features // GROUP)
    scale = 2.0 ** -torch.randint(3, 6, (out_features, groups), generator=generator).float()
    q = torch.randint(0, 16, (out_features, in_features), generator=generator)
    q[:, 0::32], q[:, 1::32] = 0, 15
    return (q - 8).float() * scale.repeat_interleave(GROUP, dim=1)[:, :in_features]


# The layers the kit builds: (kind, checkpoint matrices' output features). Fused layers
# load several checkpoint matrices (q, k, v; gate, up) into one, as the model families do.
LAYER_KINDS = ("column", "row", "merged", "qkv")
QKV_HEAD_SIZE = 16


def _layer(kind: str, in_f: int, out_f: int, bias: bool, method, dtype, device):
    """``(layer, [(shard arguments, output features)] of its checkpoint matrices)``."""
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.layers.linear import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        RowParallelLinear,
    )

    ctx = ModelContext(dtype, device, None, method, ParallelInfo())  # type: ignore[arg-type]
    with torch.device(device):
        if kind == "merged":  # gate and up of unequal widths
            sizes = [out_f, out_f // 2]
            return MergedColumnParallelLinear(in_f, sizes, ctx, bias=bias), [
                ((0,), sizes[0]),
                ((1,), sizes[1]),
            ]
        if kind == "qkv":  # grouped-query: two query heads per KV head
            kv_heads = max(1, out_f // (4 * QKV_HEAD_SIZE))
            layer = QKVParallelLinear(in_f, QKV_HEAD_SIZE, 2 * kv_heads, kv_heads, ctx, bias=bias)
            kv = kv_heads * QKV_HEAD_SIZE
            return layer, [(("q",), 2 * kv), (("k",), kv), (("v",), kv)]
        cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
        return cls(in_f, out_f, ctx, bias=bias), [((), out_f)]


def _load_checkpoint_matrix(
    layer: nn.Module, method: QuantizationMethod, dense: torch.Tensor, shard: tuple
) -> None:
    """As the engine loads a checkpoint: each tensor the format stores for ``dense``
    through the layer's ``weight_loader``."""
    stored = method.checkpoint_tensors(dense)
    params = dict(layer.named_parameters(recurse=False))
    unknown = sorted(set(stored) - set(params))
    if unknown:
        raise ValueError(
            f"checkpoint_tensors gave {unknown}, which name no parameter of the layer "
            f"(its parameters: {sorted(params)})"
        )
    for name, tensor in stored.items():
        layer.weight_loader(params[name], tensor.to(params[name].dtype), *shard)


def _run_dtype(checker: Checker, method: QuantizationMethod, dtype, device, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    for in_f, out_f in SHAPES:
        for kind in LAYER_KINDS:
            for bias in (False, True):
                where = f"[{device.type}, {str(dtype).removeprefix('torch.')}, {kind} "
                where += f"{in_f}->{out_f}{', bias' if bias else ''}]"
                try:
                    layer, matrices = _layer(kind, in_f, out_f, bias, method, dtype, device)
                    weights = [grid_weight(rows, in_f, g).to(dtype) for _, rows in matrices]
                    dense = torch.cat(weights)
                    b = (torch.randn(dense.shape[0], generator=g) * 0.1).to(dtype)
                    b = b if bias else None
                    holder = nn.Module()
                    holder.linear = layer
                    for (shard, _), weight in zip(matrices, weights, strict=True):
                        _load_checkpoint_matrix(layer, method, weight.to(device), shard)
                    if b is not None:
                        offset = 0
                        for (shard, rows), _ in zip(matrices, weights, strict=True):
                            part = b[offset : offset + rows].to(device)
                            layer.weight_loader(layer.bias, part, *shard)
                            offset += rows
                    method.process_weights_after_loading(layer)
                    method.process_model_after_loading(holder)
                except Exception as exc:
                    checker.crashed(f"{where} building and loading the layer", exc)
                    continue
                _check_outputs(checker, layer, where, dense, b, dtype, device, tol, g)
                checker.result.checked.append(where)


def _check_outputs(checker, layer, where, dense, b, dtype, device, tol, g) -> None:
    out_f, in_f = dense.shape
    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=g).to(dtype)
        try:
            with torch.no_grad():
                y = layer(x.to(device))
        except Exception as exc:
            checker.crashed(f"{where} apply at batch {batch}", exc)
            continue
        if y.shape != (batch, out_f) or y.dtype != dtype:
            checker.fail(
                f"{where} batch {batch}: output {tuple(y.shape)} {y.dtype}, "
                f"expected {(batch, out_f)} {dtype}"
            )
            continue
        ref = F.linear(x.double(), dense.double(), None if b is None else b.double())
        err = (y.detach().cpu().double() - ref).norm(dim=1)
        size = ref.norm(dim=1).clamp_min(1e-12)
        worst = float((err / size).nan_to_num(float("inf")).max())
        checker.expect(
            worst <= tol,
            f"{where} batch {batch}: a row's relative error is {worst:.3g} "
            f"(tolerance {tol:.3g}) against x @ W.T + b of the loaded weights",
        )


def _device_and_dtypes() -> tuple[torch.device, list[torch.dtype]]:
    """Where the engine would run here (the chosen platform), in each dtype it supports."""
    from tessellm.plugins import get_plugins
    from tessellm.selection import choose_platform

    try:
        platform, _ = choose_platform(get_plugins())
        device, supported = platform.device(), tuple(platform.supported_dtypes())
    except Exception:
        device, supported = torch.device("cpu"), tuple(ROW_TOLERANCES)
    return device, [d for d in ROW_TOLERANCES if d in supported]


def check_quantization_method(
    name: str,
    *,
    dtypes: list[torch.dtype] | None = None,
    rel_tol: float | None = None,
    quant_config: dict | None = None,
) -> CheckResult:
    """Check the quantization method registered as ``name``.

    The method is built with ``from_config(quant_config)`` (default None: the format's
    defaults). On the device of the platform the engine picks here, if the method's
    ``validate`` accepts it, linear layers of several shapes (column- and row-parallel,
    and fused gate/up and q/k/v layers that load several checkpoint matrices), with and
    without bias, are created through the method (``create_weights``), loaded from what
    ``checkpoint_tensors`` stores for each matrix through the layers' ``weight_loader``,
    processed (``process_weights_after_loading``, ``process_model_after_loading``) and
    applied at batch 1, 5 and 40; each output row must lie within ``rel_tol`` (default
    ``ROW_TOLERANCES[dtype]`` plus the method's declared ``capabilities.row_error``) of
    ``x @ W.T + b`` computed in float64. The weights lie on a 4-bit grid (see
    ``grid_weight``). ``dtypes``: default every dtype of ``ROW_TOLERANCES`` that both the
    platform and the method support."""
    from tessellm.plugins import get_plugins
    from tessellm.selection import cuda_capability

    checker = Checker(name, "quantization_method")
    try:
        cls = get_plugins().load("quantization_methods", name)
        method = cls.from_config(quant_config)
    except Exception as exc:
        checker.crashed("loading and constructing the method", exc)
        return checker.finish()
    if not isinstance(method, QuantizationMethod):
        checker.fail(f"registered target {cls!r} does not build a QuantizationMethod")
        return checker.finish()
    device, default_dtypes = _device_and_dtypes()
    capability = cuda_capability(device)
    chosen = dtypes or [d for d in default_dtypes if d in method.capabilities.dtypes]
    refusals = []
    for dtype in chosen:
        reasons = method.validate(device.type, dtype, capability)
        if reasons:
            refusals.append(f"{str(dtype).removeprefix('torch.')}: {'; '.join(reasons)}")
            continue
        tol = rel_tol
        if tol is None:
            tol = ROW_TOLERANCES.get(dtype, 2e-2) + method.capabilities.row_error
        try:
            _run_dtype(checker, method, dtype, device, tol)
        except Exception as exc:
            checker.crashed(f"[{dtype}]", exc)
    if not checker.result.checked and not checker.result.failures:
        return checker.skip(
            f"cannot run on {device.type} here ({' / '.join(refusals) or 'no dtype'})"
        )
    return checker.finish()
