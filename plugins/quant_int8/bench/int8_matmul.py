"""Time the int8 matmul paths against dense matmuls on this machine's CPU.

    python plugins/quant_int8/bench/int8_matmul.py [--threads 1 2] [--batches 1 16 64]

Shapes are SmolLM2-135M's (the default model): hidden 576, MLP 1536 (the fused gate/up
layer is 3072 x 576, down 576 x 1536). For each batch size M (rows, tokens) it prints,
per linear, the median time of each path:

- ``dense fp32`` / ``dense bf16``: ``F.linear`` with the dense weight;
- ``w8a8 int_mm``: activations quantized per token, ``torch._int_mm`` with the ``[N, K]``
  int8 weight viewed transposed, rescaled (what CUDA runs);
- ``w8a8 int_mm KN``: the same with the weight stored contiguous as ``[K, N]``;
- ``w8a8 int8pack``: the integer activations in bf16 through ``aten._weight_int8pack_mm``
  with unit scales, rescaled in float32 (the CPU's path up to 16 rows);
- ``w8a8 float32``: the float32 matmul of the integers, the weight cast per call (the
  CPU's path beyond 16 rows);
- ``w8a8 method``: ``int8_linear`` as the ``int8`` method calls it (the chosen path);
- ``woq int8pack fp32/bf16``: ``aten._weight_int8pack_mm`` (int8 weight, activations in
  the run dtype);
- ``woq cast fp32/bf16``: the weight cast to the run dtype per call, matmul, scale;
- ``woq method fp32/bf16``: ``weight_only_int8_linear`` as ``int8_weight_only`` calls it.

Measured on this project's machine (AMD EPYC, family 23: AVX2, no AVX-512/VNNI; torch
2.13 CPU; 1 thread, other jobs running, load 3-4), 1536 x 576, median microseconds:

| path              |   M=1 |  M=16 |  M=64 |
| ----------------- | ----- | ----- | ----- |
| dense fp32        |    80 |   526 |  1691 |
| dense bf16        |   255 |  3841 | 15415 |
| w8a8 int_mm       |   745 | 11096 | 43813 |
| w8a8 int8pack     |   116 |   759 |  2963 |
| w8a8 float32      |   249 |   743 |  2014 |
| w8a8 method       |   138 |   773 |  2076 |
| woq int8pack bf16 |    78 |   713 |  2703 |
| woq int8pack fp32 |   827 | 13854 | 53877 |
| woq cast fp32     |   210 |   843 |  1880 |
| woq method bf16   |    90 |   714 |  2096 |
| woq method fp32   |   210 |   703 |  1962 |

576 x 1536 and 3072 x 576 give the same ranking. ``torch._int_mm`` is 5-20x slower than
the float matmul of the same integers at every M; ``_weight_int8pack_mm`` is fast in bf16
only; bf16 x bf16 matmuls are slow on this CPU. Hence the CPU paths: up to 16 rows
``_weight_int8pack_mm`` in bf16, beyond that float32 (about even at 16 rows).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tessellm_quant_int8.kernels import (
    int8_linear,
    quantize_per_channel_int8,
    quantize_per_token_int8,
    weight_only_int8_linear,
)

SHAPES = {"up 1536x576": (1536, 576), "gate_up 3072x576": (3072, 576), "down 576x1536": (576, 1536)}


def median_us(fn: Callable[[], object], min_time: float = 0.3) -> float:
    for _ in range(5):
        fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_time or len(times) < 20:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def paths(m: int, n: int, k: int) -> dict[str, Callable[[], object]]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    q, scale = quantize_per_channel_int8(weight)
    q_kn = q.t().contiguous()
    w_bf16, x_bf16 = weight.bfloat16(), x.bfloat16()
    scale_row = scale.view(-1)
    ones = torch.ones(n, dtype=torch.bfloat16)
    int8pack = torch.ops.aten._weight_int8pack_mm

    def int_mm_kn() -> torch.Tensor:
        xq, xs = quantize_per_token_int8(x)
        return torch._int_mm(xq, q_kn).float() * xs * scale_row

    def w8a8_int8pack() -> torch.Tensor:
        xq, xs = quantize_per_token_int8(x, torch.bfloat16)
        return int8pack(xq, q, ones).float() * xs * scale_row

    def w8a8_float32() -> torch.Tensor:
        xq, xs = quantize_per_token_int8(x)
        return F.linear(xq.float(), q.float()) * xs * scale_row

    return {
        "dense fp32": lambda: F.linear(x, weight),
        "dense bf16": lambda: F.linear(x_bf16, w_bf16),
        "w8a8 int_mm": lambda: int8_linear(x, q, scale, None, use_int_mm=True),
        "w8a8 int_mm KN": int_mm_kn,
        "w8a8 int8pack": w8a8_int8pack,
        "w8a8 float32": w8a8_float32,
        "w8a8 method fp32": lambda: int8_linear(x, q, scale, None),
        "w8a8 method bf16": lambda: int8_linear(x_bf16, q, scale, None),
        "woq int8pack fp32": lambda: int8pack(x, q, scale_row),
        "woq int8pack bf16": lambda: int8pack(x_bf16, q, scale_row.bfloat16()),
        "woq cast fp32": lambda: F.linear(x, q.float()) * scale_row,
        "woq cast bf16": lambda: F.linear(x_bf16, q.bfloat16()) * scale_row.bfloat16(),
        "woq method fp32": lambda: weight_only_int8_linear(x, q, scale, None),
        "woq method bf16": lambda: weight_only_int8_linear(x_bf16, q, scale, None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in args.shapes:
            n, k = SHAPES[shape]
            for m in args.batches:
                print(f"\n{threads} thread(s), {shape} (N x K), M={m}: median us")
                results = {name: median_us(fn) for name, fn in paths(m, n, k).items()}
                base = results["dense fp32"]
                for name, us in results.items():
                    print(f"  {name:24s} {us:9.1f}   x{base / us:5.2f} vs dense fp32")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
