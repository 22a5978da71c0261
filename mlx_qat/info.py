"""`python -m mlx_qat.info`: what MLX runs on here, and how fast its matmul is."""

import argparse
import platform
import time

import mlx.core as mx  # after the package's __init__, which loads the optimized BLAS first

from . import blas
from .fakequant import checked_kernel, select_backend
from .quantizers import QuantSpec


def backend() -> str:
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "cpu"


def fake_quant_backend() -> str:
    """The path fake_quant takes here: the device's kernel, after the self-check it runs on first use."""
    name = select_backend()
    if name == "mlx":
        return name
    _, problem = checked_kernel(QuantSpec(4, 64), name)
    if problem:
        return f"mlx (the {name} kernel is not usable here: {problem.splitlines()[0]})"
    return f"{name} (fused kernel)"


def matmul_gflops(n: int = 1024, repeats: int = 10, device=mx.cpu) -> float:
    """Measured float32 n×n×n matmul throughput (best of `repeats`)."""
    with mx.stream(device):
        a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
        mx.eval(a @ b)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(a @ b)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="matmul size n (n×n×n)")
    args = parser.parse_args()
    print(f"mlx        {mx.__version__}")
    print(f"platform   {platform.system()} {platform.machine()}")
    print(f"backend    {backend()}")
    print(f"blas       {blas.describe()}")
    print(f"fake_quant {fake_quant_backend()}")
    print(f"matmul     {matmul_gflops(args.size):.1f} GFLOP/s (float32 {args.size}³ on the CPU)")


if __name__ == "__main__":
    main()
