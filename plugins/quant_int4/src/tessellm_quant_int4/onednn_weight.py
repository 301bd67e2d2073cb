"""Dense CPU weights in oneDNN's blocked layout, for calls of many rows.

torch's plain CPU GEMM (MKL) packs its weight operand at every call. For the calls a
small model's prefill makes (30 rows against SmolLM2's 576 x 3072 matrices) that packing
was a third of the GEMM time on a 2-core AVX2 EPYC; oneDNN's linear over a weight
reordered once at load skips it (30-token prefill 150 -> 104 ms there). The product is
the same up to fp32 summation order.

A blocked tensor can be neither exported nor pickled. A trace (the CPU's compiled decode
libraries, which take the weights as inputs) calls the custom op ``blocked_linear`` with
the plain weight instead: run in the process that made the blocked copy, it looks the copy
up by the plain weight's storage (a registry entry lives as long as that tensor), and
multiplies the plain weight where there is none. The compiled library reaches the op
through torch's dispatcher, so this module must be imported before one is loaded (the
quantization plugins that make copies import it). A pickled model (the CPU platform's
background build) carries no blocked weights, only a weightless ``OneDnnWeight`` where
the original had one: its trace calls the op there.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

# oneDNN picks its blocking for a batch size: the prefill chunks and batches this serves.
BATCH_HINT = 32

# (data_ptr, shape, stride, dtype) of a plain weight -> its blocked copy, while it lives.
_BLOCKED: dict[tuple, torch.Tensor] = {}


def _key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype)


class OneDnnWeight:
    """``dense`` ([out, in], fp32 or bf16, CPU) reordered once; None after unpickling."""

    def __init__(self, dense: torch.Tensor | None) -> None:
        self.weight = self.dtype = None
        if dense is not None:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(dense, BATCH_HINT)
            self.dtype = dense.dtype
            key = _key(dense)
            _BLOCKED[key] = self.weight
            # Gone with the plain tensor: its address may be reused by another.
            weakref.finalize(dense, _BLOCKED.pop, key, None)

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
        out = _blocked_product(rows, self.weight)
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)


def _blocked_product(rows: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """``rows`` ([n, in]) times a weight reordered by ``_reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(rows, blocked, None, "none", [], "")


@torch.library.custom_op("tessellm_quant_int4::blocked_linear", mutates_args=())
def blocked_linear(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``x`` ([rows, in], ``dense``'s dtype) ``@ dense.T`` through its blocked copy if this
    process made one, else through ``dense``."""
    blocked = _BLOCKED.get(_key(dense))
    return F.linear(x, dense) if blocked is None else _blocked_product(x, blocked)


@blocked_linear.register_fake
def _blocked_linear_shape(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], dense.shape[0])


def dense_linear(
    x: torch.Tensor, dense: torch.Tensor | None, blocked: OneDnnWeight | None
) -> torch.Tensor:
    """``x @ dense.T`` through ``blocked`` where it can; traced (or in a pickled copy,
    where ``blocked`` is weightless), through ``blocked_linear``; else the plain copy."""
    if blocked is None:
        return F.linear(x.to(dense.dtype), dense).to(x.dtype)
    if blocked.usable():
        return blocked.linear(x)
    rows = x.reshape(-1, x.shape[-1]).to(dense.dtype)
    out = torch.ops.tessellm_quant_int4.blocked_linear(rows, dense)
    return out.view(*x.shape[:-1], dense.shape[0]).to(x.dtype)
