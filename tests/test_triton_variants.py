"""The eager-path Triton kernels compile one variant however a step's batch changes.

Triton specialises every integer argument by value class (1, a multiple of 16, other) and
compiles a variant per class combination the first time it sees it: on a GPU a fraction
of a second each, paid by whichever request's step meets the combination first (eager
prefill and mixed steps only: decode steps replay CUDA graphs). The arguments that change
from step to step (sequence count, token count, block-table width) are therefore left
unspecialised. Counted here on the CPU with Triton's own CUDA argument binder (no GPU:
the binder only classifies the arguments, nothing is compiled or launched).
"""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
jit = pytest.importorskip("triton.runtime.jit")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")
tl = pytest.importorskip("triton.language")


def cuda_binder(kernel):
    """Triton's argument binder of ``kernel`` for an H100 target (a JITFunction rebuilt from
    the interpreted one when TRITON_INTERPRET is on, with the same decorator arguments)."""
    if not isinstance(kernel, jit.JITFunction):
        kernel = jit.JITFunction(kernel.fn, **kernel.kwargs)
    backend = compiler.make_backend(backends.GPUTarget("cuda", 90, 32))
    return kernel, jit.create_function_from_signature(kernel.signature, kernel.params, backend)


def variants(kernel, varying: dict[str, list[int]]) -> int:
    """How many compiled variants ``kernel`` needs over every combination of ``varying``
    (other integers held at 64, pointers at 16-byte-aligned tensors, constexprs at 1)."""
    kernel, binder = cuda_binder(kernel)
    pointer = torch.zeros(64, dtype=torch.int32)
    keys = set()
    for values in itertools.product(*varying.values()):
        chosen = dict(zip(varying, values, strict=True))
        args = []
        for param in kernel.params:
            if param.is_constexpr:
                args.append(1)
            elif param.name in chosen:
                args.append(chosen[param.name])
            elif param.name.endswith("_ptr"):
                args.append(pointer)
            elif param.name in ("scale", "soft_cap", "eps"):
                args.append(0.5)
            else:
                args.append(64)
        _, specialization, _ = binder(*args)
        keys.add(str(specialization))
    return len(keys)


def test_the_binder_counts_the_classes_of_a_specialised_argument():
    # The measure itself: a plain integer argument gets one variant per value class.
    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    assert variants(kernel, {"n": [1, 2, 16, 17, 32]}) == 3


def test_prefill_attention_compiles_once_for_any_batch():
    from tessellm_attention_triton.kernels.prefill import _prefill_kernel

    shapes = {"num_seqs": [1, 2, 3, 16, 17, 32], "stride_bt": [1, 3, 16, 17, 20]}
    assert variants(_prefill_kernel, shapes) == 1


def test_decode_attention_compiles_once_for_any_block_table_width_and_split_count():
    from tessellm_attention_triton.kernels.decode import _decode_kernel, _reduce_kernel

    # The split count's power-of-two bound (SPLITS_P) is a constexpr, held at 1 here.
    shapes = {"num_splits": [2, 3, 16, 17], "stride_bt": [1, 3, 16, 17, 20]}
    assert variants(_decode_kernel, shapes) == 1
    assert variants(_reduce_kernel, {"num_splits": [2, 3, 16, 17]}) == 1


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("tessellm_quant_int4.triton_int4", "_int4_gemm_kernel"),
        ("tessellm_gguf.triton_matmul", "_gguf_mm_kernel"),
    ],
)
def test_quantized_gemms_compile_once_for_any_token_count(module, name):
    kernel = getattr(pytest.importorskip(module), name)
    assert variants(kernel, {"M": [1, 2, 7, 16, 31, 64, 100]}) == 1
