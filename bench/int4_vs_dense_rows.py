"""Where a dense GEMM overtakes torch's int4 CPU kernel, by rows per call.

For SmolLM2-135M's matrix shapes (576 -> 1536, 1536 -> 576, the 3072-row fused
gate/up), times ``_weight_int4pack_mm_for_cpu`` on bf16 rows against an fp32 GEMM on the
same rows (cast in and out, as the GGUF runtime's dense copies run on CPUs without
AVX-512) at 1-64 rows; prints one line per shape and row count. The crossover sets
``tessellm_gguf.runtime.DENSE_COPY_MAX_PACKED_ROWS``.

    OMP_NUM_THREADS=2 python bench/int4_vs_dense_rows.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tessellm_quant_int4.cpu_int4 import GROUP_SIZE, INT4_MM, pack_int4

SHAPES = ((1536, 576), (576, 1536), (3072, 576))
ROWS = (1, 2, 4, 8, 12, 16, 24, 32, 64)


def microseconds(fn, *args, iterations: int = 200) -> float:
    for _ in range(10):
        fn(*args)
    start = time.perf_counter()
    for _ in range(iterations):
        fn(*args)
    return (time.perf_counter() - start) / iterations * 1e6


def dense_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight).bfloat16()


def main() -> None:
    torch.manual_seed(0)
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}")  # fmt: skip
    for out_features, in_features in SHAPES:
        weight = torch.randn(out_features, in_features)
        packed, scales_zeros = pack_int4(weight.bfloat16(), grid_only=False)
        for rows in ROWS:
            x = torch.randn(rows, in_features).bfloat16()
            int4 = microseconds(INT4_MM, x, packed, GROUP_SIZE, scales_zeros)
            dense = microseconds(dense_fp32, x, weight)
            print(f"{out_features}x{in_features} rows {rows:2d}: int4 bf16 {int4:7.0f} us, "
                  f"dense fp32 {dense:7.0f} us, dense/int4 {dense / int4:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
