"""fake_quant forward+backward: this path vs the naive straight-through composite, and
effective bandwidth vs the machine's copy bandwidth, measured in one run; for the float formats
(mxfp4, nvfp4, mxfp8), this path vs their MLX-ops reference, compiled and eager.

The naive composite is the usual autograd formulation (LSQ paper, ParetoQ's reference code
style): ŵ = α_s · (x + stop_gradient(q(x) − x)) with the α gradient scaled by s through
α_s = α·s + stop_gradient(α − α·s) and the straight-through mask written as clip/where ops.
Bytes moved per element: forward reads w and writes ŵ, backward reads w and g and writes dw
(20 bytes in float32; α is negligible). Copy bandwidth: numpy copy on the CPU, a device copy
on a GPU; for context, `mlx_copy_GBps` is an MLX elementwise pass (w * 1). Outputs come from
MLX's buffer cache sized as training sizes it (step.keep_freed_buffers), as numpy's copy reuses
its destination; `ours_default_cache_ms` is the same call under MLX's default CPU cache (32 MB),
where multi-MB outputs are fresh pages from the OS.

    python benchmarks/bench_fake_quant.py [--bits 2 4] [--sizes 1 4 16 64] [--modes mxfp4 nvfp4 mxfp8]
        [--out benchmarks/results/fake_quant_cpu.json]
"""

import argparse
import json
import time

import mlx_qat  # noqa: F401  (fast BLAS first)
from common import emit, machine
from mlx_qat import QuantSpec, fake_quant, init_scale
from mlx_qat.fakequant import fake_quant_fp, select_backend
from mlx_qat.fp_formats import FORMATS, fake_quant_fp_ste
from mlx_qat.quantizers import CLIP, gradient_scale, level
from mlx_qat.step import keep_freed_buffers

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402


def naive(w, alpha, spec: QuantSpec):
    """The composite others write: STE via stop_gradient, LSQ gradient scale via a detached trick."""
    s = gradient_scale(w.size, spec)
    a = alpha * s + mx.stop_gradient(alpha - alpha * s)
    a = mx.maximum(a, 1e-5)
    g = spec.group_size_for(w.shape[1])
    x = w.reshape(w.shape[0], -1, g) / a[..., None]
    if spec.kind == "binary":
        x_c = x
        passes = mx.abs(x) <= 1
    elif spec.kind == "lsq":
        x_c = mx.clip(x, spec.qn, spec.qp)
        passes = None
    else:
        x_c = mx.clip(x, -CLIP, CLIP)
        passes = None
    q = level(x_c, spec)
    x_ste = x_c + mx.stop_gradient(q - x_c)
    if passes is not None:  # binary: pass the gradient inside |x| <= 1 only
        x_ste = mx.where(passes, x_ste, mx.stop_gradient(x_ste))
    return (x_ste * a[..., None]).reshape(w.shape)


def timed(fn, repeats: int) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(n: int, repeats: int) -> float:
    """Bytes per second of a plain copy of n float32s (read + write)."""
    if mx.default_device() == mx.cpu:
        src, dst = np.random.rand(n).astype(np.float32), np.empty(n, np.float32)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            np.copyto(dst, src)
            best = min(best, time.perf_counter() - start)
    else:
        src = mx.random.uniform(shape=(n,))
        best = timed(lambda: mx.array(src) + 0, repeats)  # a device-to-device pass
    return 8 * n / best


def float_format_row(mode: str, w, g, backend: str, copy: float, repeats: int) -> dict:
    """A float format's fake-quant forward+backward: ours vs its MLX-ops reference (the same
    straight-through VJP) compiled and eager; ŵ and dw are bit for bit the same in all three."""
    def vjp(path):
        return lambda w, g: mx.vjp(lambda w: fake_quant_fp(w, mode, backend=path), [w], [g])

    ours, reference = mx.compile(vjp(backend)), mx.compile(vjp("mlx"))
    eager = lambda: mx.vjp(lambda w: fake_quant_fp_ste(w, mode), [w], [g])  # noqa: E731  (the reference, uncompiled)
    t_ours = timed(lambda: ours(w, g), repeats)
    t_compiled = timed(lambda: reference(w, g), repeats)
    t_eager = timed(eager, repeats)
    bandwidth = 20 * w.size / t_ours
    return {"elements": w.size, "shape": list(w.shape), "mode": mode, "ours_ms": round(1e3 * t_ours, 2),
            "reference_compiled_ms": round(1e3 * t_compiled, 2), "reference_eager_ms": round(1e3 * t_eager, 2),
            "speedup_vs_reference_compiled": round(t_compiled / t_ours, 2),
            "speedup_vs_reference_eager": round(t_eager / t_ours, 2), "effective_GBps": round(bandwidth / 1e9, 2),
            "fraction_of_copy_bandwidth": round(bandwidth / copy, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=float, nargs="*", default=[2, 4], help="affine widths (none: the float formats alone)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64], help="millions of elements")
    parser.add_argument("--modes", nargs="*", default=list(FORMATS), choices=list(FORMATS),
                        help="float formats, each timed against its MLX-ops reference (compiled and eager)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    keep_freed_buffers()  # as training does
    backend = select_backend()  # the fused kernel of this device; MLX_QAT_FAKE_QUANT=mlx for the reference
    rows = []
    for millions in args.sizes:
        n = millions * 2**20
        rows_ = 1024 * int(np.sqrt(millions)) if millions in (1, 4, 16, 64) else 1024
        cols = n // rows_
        w = mx.random.normal((rows_, cols))
        g = mx.random.normal((rows_, cols))
        copy = copy_bandwidth(n, args.repeats)
        mlx_copy = 8 * n / timed(lambda: w * 1.0, args.repeats)
        for bits in args.bits:
            spec = QuantSpec(bits, args.group_size)
            alpha = init_scale(w, spec)
            mx.eval(w, g, alpha)
            # Ours as it runs in training: inside a compiled step.
            ours_vjp = mx.compile(lambda w, a, g: mx.vjp(lambda w, a: fake_quant(w, a, spec, backend=backend), [w, a], [g]))
            ours = lambda: ours_vjp(w, alpha, g)  # noqa: E731
            composite = lambda w, a: naive(w, a, spec)  # noqa: E731
            eager = lambda: mx.vjp(composite, [w, alpha], [g])  # noqa: E731
            compiled_vjp = mx.compile(lambda w, a, g: mx.vjp(composite, [w, a], [g]))
            default_cache = mx.set_cache_limit(32 << 20)
            t_default_cache = timed(ours, args.repeats)
            mx.set_cache_limit(default_cache)
            t_ours = timed(ours, args.repeats)
            t_eager = timed(eager, args.repeats)
            t_compiled = timed(lambda: compiled_vjp(w, alpha, g), args.repeats)
            bandwidth = 20 * n / t_ours
            rows.append({
                "elements": n, "shape": [rows_, cols], "bits": bits, "group_size": args.group_size,
                "ours_ms": round(1e3 * t_ours, 2), "ours_default_cache_ms": round(1e3 * t_default_cache, 2),
                "naive_eager_ms": round(1e3 * t_eager, 2),
                "naive_compiled_ms": round(1e3 * t_compiled, 2),
                "speedup_vs_naive_eager": round(t_eager / t_ours, 2),
                "speedup_vs_naive_compiled": round(t_compiled / t_ours, 2),
                "effective_GBps": round(bandwidth / 1e9, 2), "copy_GBps": round(copy / 1e9, 2),
                "mlx_copy_GBps": round(mlx_copy / 1e9, 2),
                "fraction_of_copy_bandwidth": round(bandwidth / copy, 3),
            })
            print(json.dumps(rows[-1]))
        for mode in args.modes:
            rows.append(float_format_row(mode, w, g, backend, copy, args.repeats))
            print(json.dumps(rows[-1]))
    result = {
        "command": "python benchmarks/bench_fake_quant.py " + " ".join(
            [f"--bits {' '.join(map(str, args.bits))}", f"--sizes {' '.join(map(str, args.sizes))}",
             f"--modes {' '.join(args.modes)}"]),
        "backend": backend,
        "device": str(mx.default_device()),
        "machine": machine(),
        "mlx": mx.__version__,
        "targets": {"speedup_vs_naive": 3.0, "fraction_of_copy_bandwidth_cpu": 0.5, "fraction_of_copy_bandwidth_cuda": 0.7},
        "rows": rows,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
