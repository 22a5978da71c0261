"""MLX float32 matmul inside an mlx_qat process vs numpy's matmul, in one run.

Target (issue: QAT core): MLX >= 0.8x numpy's GFLOP/s on the same machine.
    python benchmarks/bench_blas.py [--size 1024] [--out benchmarks/results/blas.json]
"""

import argparse
import time
from pathlib import Path

from common import emit, machine

import mlx_qat  # noqa: F401  (loads the optimized BLAS before mlx.core)
from mlx_qat import blas
from mlx_qat.info import matmul_gflops

import numpy as np  # noqa: E402


def numpy_gflops(n: int, repeats: int = 10) -> float:
    a, b = np.random.randn(n, n).astype(np.float32), np.random.randn(n, n).astype(np.float32)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    # Interleave the two so that machine noise hits both alike.
    mlx_runs, numpy_runs = [], []
    for _ in range(3):
        mlx_runs.append(matmul_gflops(args.size))
        numpy_runs.append(numpy_gflops(args.size))
    result = {
        "size": args.size,
        "machine": machine(),
        "blas": Path(blas.describe()).name if blas.loaded else blas.describe(),
        "mlx_gflops": max(mlx_runs),
        "numpy_gflops": max(numpy_runs),
        "ratio": max(mlx_runs) / max(numpy_runs),
        "target_ratio": 0.8,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
