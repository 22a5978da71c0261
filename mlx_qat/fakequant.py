"""The fake-quant op: ŵ = fake_quant(w, α, spec), differentiable in w and α.

One `mx.custom_function` per (spec, backend) whose VJP is the straight-through estimator of
`quantizers.straight_through`: dw = g·pass(x), dα = s·Σ_group g·∂q/∂α(x), x = w / α. The math
lives in a backend: `mlx` is MLX ops under `mx.compile` (the reference, the methods of the
spec's `Quantizer`); `cpu` is the fused, vectorized, multi-threaded kernel of cpu.py; `metal`
and `cuda` run the kernels of gpu.py. The kernels share the per-element math of
kernels/fake_quant.h, pick the kind by the `Quantizer.kernel_id` they are given, and each checks
itself against the reference once per spec before it is used.
"""

import functools
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx

from .quantizers import QuantSpec, affine_grid, codes, gradient_scale, grouped, scaled, straight_through

BACKEND_ENV_VAR = "MLX_QAT_FAKE_QUANT"

Forward = Callable[[mx.array, mx.array], mx.array]
Backward = Callable[[mx.array, mx.array, mx.array], Tuple[mx.array, mx.array]]


def _mlx_backend(spec: QuantSpec) -> Tuple[Forward, Backward]:
    def forward(w, alpha):
        x, a = scaled(w, alpha, spec)
        scale, bias = affine_grid(a, spec)
        return (codes(x, spec) * scale + bias).reshape(w.shape).astype(w.dtype)

    def backward(w, alpha, g):
        x, _ = scaled(w, alpha, spec)
        passes, unit = straight_through(x, spec)
        g = grouped(g, spec).astype(mx.float32)
        dw = mx.where(passes, g, 0.0).reshape(w.shape).astype(w.dtype)
        dalpha = (g * unit).sum(axis=-1) * gradient_scale(w.size, spec)
        return dw, dalpha.astype(alpha.dtype)

    return mx.compile(forward), mx.compile(backward)


def _cpu_backend(spec: QuantSpec) -> Tuple[Forward, Backward]:
    from . import cpu

    kernel, kind = cpu.load(), spec.quantizer.kernel_id

    def forward(w, alpha):
        return kernel.forward(w, alpha, kind, spec.qn, spec.qp)

    def backward(w, alpha, g):
        dw, dalpha = kernel.backward(w, alpha, g, kind, spec.qn, spec.qp, gradient_scale(w.size, spec))
        return dw, dalpha.astype(alpha.dtype)

    return forward, backward


def _gpu_backend(name: str):
    def make(spec: QuantSpec):
        from . import gpu

        return gpu.backend(name, spec)

    return make


# name -> (spec -> (forward, backward))
BACKENDS: Dict[str, Callable[[QuantSpec], Tuple[Forward, Backward]]] = {
    "mlx": _mlx_backend,
    "cpu": _cpu_backend,
    "metal": _gpu_backend("metal"),
    "cuda": _gpu_backend("cuda"),
}


def available_backends() -> list:
    found = ["mlx", "cpu"]
    if mx.metal.is_available():
        found.append("metal")
    if mx.cuda.is_available():
        found.append("cuda")
    return found


def select_backend() -> str:
    """The kernel for the default device: Metal or CUDA on a GPU, the fused kernel on the CPU.
    $MLX_QAT_FAKE_QUANT=mlx forces the reference path (for debugging and benchmarks)."""
    available = available_backends()
    forced = os.environ.get(BACKEND_ENV_VAR)
    if forced:
        if forced not in available:
            raise ValueError(f"{BACKEND_ENV_VAR}={forced!r} is not available here; use one of {available}")
        return forced
    if mx.default_device() == mx.cpu:
        return "cpu"
    return available[-1]


def _probe(spec: QuantSpec):
    """A small weight whose x = w/α hits rounding ties, clip edges and zero, with α and g."""
    group = spec.group_size or 64
    x = mx.concatenate([
        mx.array([0.0, 0.5, -0.5, 1.5, -1.5, 0.99, -0.99, 1.0, -1.0, spec.qp + 0.5, spec.qn - 0.5, spec.qp + 1.0]),
        mx.random.uniform(spec.qn - 2, spec.qp + 2, (4 * group - 12,), key=mx.random.key(0)),
    ]).reshape(2, 2 * group)
    groups = 2 if spec.group_size else 1  # each row holds two groups, or is one channel
    return x * 0.5, mx.full((2, groups), 0.5), mx.random.normal(x.shape, key=mx.random.key(1))


def _check_kernel(spec: QuantSpec, forward: Forward, backward: Backward) -> str:
    """'' if a kernel reproduces the MLX reference on a probe, else what went wrong."""
    w, alpha, g = _probe(spec)
    ref_forward, ref_backward = _mlx_backend(spec)
    try:
        got = [forward(w, alpha), *backward(w, alpha, g)]
        mx.eval(got)
    except Exception as e:  # a kernel that does not compile, load or launch here
        return f"{type(e).__name__}: {e}"
    want = [ref_forward(w, alpha), *ref_backward(w, alpha, g)]
    if not (mx.array_equal(got[0], want[0]).item() and mx.array_equal(got[1], want[1]).item()
            and mx.allclose(got[2], want[2], rtol=1e-4, atol=1e-6).item()):
        return "its results differ from the MLX reference"
    return ""


def checked_kernel(spec: QuantSpec, backend: str) -> Tuple[Optional[Tuple[Forward, Backward]], str]:
    """(the backend's (forward, backward), '') if it builds here and agrees with the reference,
    else (None, what went wrong)."""
    try:
        forward, backward = BACKENDS[backend](spec)
        problem = _check_kernel(spec, forward, backward)
    except RuntimeError as e:  # it cannot be built here
        return None, str(e)
    return (None, problem) if problem else ((forward, backward), "")


def _kernel(spec: QuantSpec, backend: str) -> Tuple[Forward, Backward]:
    """The backend's (forward, backward), or the reference with a warning if that kernel
    cannot be built here or disagrees with the reference."""
    if backend == "mlx":
        return _mlx_backend(spec)
    kernel, problem = checked_kernel(spec, backend)
    if kernel:
        return kernel
    warnings.warn(f"mlx_qat: the {backend} fake-quant kernel for {spec} is not usable ({problem}); using the "
                  f"MLX-ops path instead. Set {BACKEND_ENV_VAR}=mlx to skip the kernels.", stacklevel=4)
    return _mlx_backend(spec)


@functools.lru_cache(maxsize=None)
def _op(spec: QuantSpec, backend: str):
    forward, backward = _kernel(spec, backend)

    @mx.custom_function
    def op(w, alpha):
        return forward(w, alpha)

    @op.vjp
    def op_vjp(primals, cotangent, output):
        return backward(*primals, cotangent)

    return op


def fake_quant(w: mx.array, alpha: mx.array, spec: QuantSpec, backend: str = None) -> mx.array:
    """Quantize-dequantize W [out, in] on the grid of α [out, in / group_size] (or [out, 1]).

    Forward: ŵ = α·q(w / α), q the spec's level function. Backward: straight-through for w
    (dw = g where the level is not clipped), LSQ-style for α (dα = s·Σ_group g·∂q/∂α, with
    s = 1/sqrt(numel(W)·Qp)).
    """
    groups = w.shape[-1] // spec.group_size_for(w.shape[-1])
    if w.ndim != 2 or alpha.shape != (w.shape[0], groups):
        raise ValueError(
            f"fake_quant needs W [out, in] and α [out, {groups}] for {spec}; got W {w.shape} "
            f"and α {alpha.shape}"
        )
    return _op(spec, backend or select_backend())(w, alpha)
