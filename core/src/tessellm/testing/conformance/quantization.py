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


def _layer(kind: str, in_f: int, out_f: int, bias: bool, method, dtype, device) -> nn.Module:
    from tessellm.interfaces.model import ModelContext, ParallelInfo
    from tessellm.layers.linear import ColumnParallelLinear, RowParallelLinear

    ctx = ModelContext(dtype, device, None, method, ParallelInfo())  # type: ignore[arg-type]
    cls = ColumnParallelLinear if kind == "column" else RowParallelLinear
    with torch.device(device):
        return cls(in_f, out_f, ctx, bias=bias)


def _run_dtype(checker: Checker, method: QuantizationMethod, dtype, device, tol: float) -> None:
    g = torch.Generator().manual_seed(0)
    for in_f, out_f in SHAPES:
        for kind in ("column", "row"):
            for bias in (False, True):
                where = f"[{device.type}, {str(dtype).removeprefix('torch.')}, {kind}-parallel "
                where += f"{in_f}->{out_f}{', bias' if bias else ''}]"
                dense = grid_weight(out_f, in_f, g).to(dtype)
                b = (torch.randn(out_f, generator=g) * 0.1).to(dtype) if bias else None
                try:
                    layer = _layer(kind, in_f, out_f, bias, method, dtype, device)
                    holder = nn.Module()
                    holder.linear = layer
                    # As the engine loads a checkpoint: through the layer's weight_loader,
                    # then the method's processing of the layer and of the model.
                    layer.weight_loader(layer.weight, dense.to(device))
                    if b is not None:
                        layer.weight_loader(layer.bias, b.to(device))
                    method.process_weights_after_loading(layer)
                    method.process_model_after_loading(holder)
                except Exception as exc:
                    checker.crashed(f"{where} building and loading the layer", exc)
                    continue
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
                        f"(tolerance {tol}) against x @ W.T + b of the loaded weights",
                    )
                checker.result.checked.append(where)


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
    name: str, *, dtypes: list[torch.dtype] | None = None, rel_tol: float | None = None
) -> CheckResult:
    """Check the quantization method registered as ``name``.

    On the device of the platform the engine picks here, column- and row-parallel linear
    layers of several shapes, with and without bias, are created through the method
    (``create_weights``), loaded with dense weights through the layers' ``weight_loader``,
    processed (``process_weights_after_loading``, ``process_model_after_loading``) and
    applied at batch 1, 5 and 40; each output row must lie within ``rel_tol`` (default
    ``ROW_TOLERANCES[dtype]``) of ``x @ W.T + b`` computed in float64. The weights lie on
    a 4-bit grid (see ``grid_weight``). ``dtypes``: default every dtype of
    ``ROW_TOLERANCES`` that the platform supports."""
    from tessellm.plugins import get_plugins

    checker = Checker(name, "quantization_method")
    try:
        cls = get_plugins().load("quantization_methods", name)
        method = cls()
    except Exception as exc:
        checker.crashed("loading and constructing the method", exc)
        return checker.finish()
    if not isinstance(method, QuantizationMethod):
        checker.fail(f"registered target {cls!r} does not build a QuantizationMethod")
        return checker.finish()
    device, default_dtypes = _device_and_dtypes()
    for dtype in dtypes or default_dtypes:
        tol = rel_tol if rel_tol is not None else ROW_TOLERANCES.get(dtype, 2e-2)
        try:
            _run_dtype(checker, method, dtype, device, tol)
        except Exception as exc:
            checker.crashed(f"[{dtype}]", exc)
    return checker.finish()
