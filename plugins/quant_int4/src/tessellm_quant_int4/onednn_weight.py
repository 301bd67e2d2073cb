"""Dense CPU weights in oneDNN's blocked layout, for eager calls of many rows.

torch's plain CPU GEMM (MKL) packs its weight operand at every call. For the calls a
small model's prefill makes (30 rows against SmolLM2's 576 x 3072 matrices) that packing
was a third of the GEMM time on a 2-core AVX2 EPYC; oneDNN's linear over a weight
reordered once at load skips it (30-token prefill 150 -> 104 ms there). The product is
the same up to fp32 summation order.

A blocked tensor can be neither exported nor pickled: traces use the plain weight, and a
pickled model (the CPU platform's background build) carries none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# oneDNN picks its blocking for a batch size: the prefill chunks and batches this serves.
BATCH_HINT = 32


class OneDnnWeight:
    """``dense`` ([out, in], fp32 or bf16, CPU) reordered once; None after unpickling."""

    def __init__(self, dense: torch.Tensor | None) -> None:
        self.weight = self.dtype = None
        if dense is not None:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(dense, BATCH_HINT)
            self.dtype = dense.dtype

    def __reduce__(self):
        return (OneDnnWeight, (None,))

    @staticmethod
    def fits(dense: torch.Tensor) -> bool:
        return (
            torch.backends.mkldnn.is_available()
            and dense.device.type == "cpu"
            and dense.dtype in (torch.float32, torch.bfloat16)
        )

    def usable(self) -> bool:
        return self.weight is not None and not torch.compiler.is_compiling()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dense.T`` in the weight's dtype, rounded once to ``x``'s."""
        rows = x.reshape(-1, x.shape[-1]).to(self.dtype)
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def dense_linear(
    x: torch.Tensor, dense: torch.Tensor | None, blocked: OneDnnWeight | None
) -> torch.Tensor:
    """``x @ dense.T`` through ``blocked`` where it can, else the plain copy."""
    if blocked is not None and blocked.usable():
        return blocked.linear(x)
    return F.linear(x.to(dense.dtype), dense).to(x.dtype)
