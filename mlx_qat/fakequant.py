"""The fake-quant op: ŵ = fake_quant(w, α, spec), differentiable in w and α.

One `mx.custom_function` per (spec, backend) whose VJP is the straight-through estimator of
`quantizers.straight_through`: dw = g·pass(x), dα = s·Σ_group g·∂q/∂α(x), x = w / α. The math
lives in a backend: `mlx` is MLX ops under `mx.compile` (the reference, the methods of the
spec's `Quantizer`); `cpu` is the fused, vectorized, multi-threaded kernel of cpu.py; `metal`
and `cuda` run the kernels of gpu.py. The kernels share the per-element math of
kernels/fake_quant.h, pick the kind by the `Quantizer.kernel_id` they are given, and each checks
itself against the reference once per spec before it is used.

The float formats (mxfp4, nvfp4, mxfp8) with derived scales have no α: `fake_quant_fp(w, mode)` is MLX's own
quantize -> dequantize with a straight-through gradient, on the same backends (the math of
kernels/fp_quant.h; the reference is fp_formats.py), checked the same way once per mode.
"""

import functools
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import mlx.core as mx

from . import fp_formats
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


def _gpu_backend(name: str, builder: str = "backend"):
    """key -> (forward, backward) of gpu.<builder>(name, key); gpu.py is imported when first used."""
    def make(key):
        from . import gpu

        return getattr(gpu, builder)(name, key)

    return make


# name -> (spec -> (forward, backward))
BACKENDS: Dict[str, Callable[[QuantSpec], Tuple[Forward, Backward]]] = {
    "mlx": _mlx_backend,
    "cpu": _cpu_backend,
    "metal": _gpu_backend("metal"),
    "cuda": _gpu_backend("cuda"),
}

# The float formats (mxfp4, nvfp4, mxfp8) with derived scales: no α, the scale from each group's
# amax (learned scales run on MLX ops: fp_formats.fake_quant_fp_learned).
FpForward = Callable[[mx.array], mx.array]
FpBackward = Callable[[mx.array, mx.array], mx.array]


def _mlx_fp_backend(mode: str) -> Tuple[FpForward, FpBackward]:
    def forward(w):
        return fp_formats.fake_quant_fp(w.astype(mx.float32), mode).astype(w.dtype)

    def backward(w, g):
        return mx.where(fp_formats.ste_mask(w.astype(mx.float32), mode), g, 0.0).astype(w.dtype)

    return mx.compile(forward), mx.compile(backward)


def _cpu_fp_backend(mode: str) -> Tuple[FpForward, FpBackward]:
    from . import cpu

    kernel, fmt, group = cpu.load(), fp_formats.KERNEL_IDS[mode], fp_formats.FORMATS[mode][0]
    return (lambda w: kernel.fp_forward(w, fmt, group)), (lambda w, g: kernel.fp_backward(w, g, fmt, group))


# name -> (mode -> (forward, backward))
FP_BACKENDS: Dict[str, Callable[[str], Tuple[FpForward, FpBackward]]] = {
    "mlx": _mlx_fp_backend,
    "cpu": _cpu_fp_backend,
    "metal": _gpu_backend("metal", "fp_backend"),
    "cuda": _gpu_backend("cuda", "fp_backend"),
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


def _fp_probe(mode: str):
    """A small weight in the format's groups: one group led by the largest element (scale 1)
    holding rounding ties, one of zeros, one of values so small that
    nvfp4's scale rounds to 0, and groups of normal values over several binades; and g."""
    group = fp_formats.FORMATS[mode][0]
    top = fp_formats.element_max(mode)
    ties = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] if top == 6 else [1.0625, 1.1875, 5.0 / 1024, 304.0, 17.0]
    planted = mx.array([top, *ties, *[-t for t in ties]] + [0.0] * (group - 1 - 2 * len(ties)))[:group]
    scales = 2.0 ** mx.arange(-8, 6, 2).reshape(-1, 1)
    random = (mx.random.normal((scales.shape[0], group), key=mx.random.key(0)) * scales).reshape(-1)
    w = mx.concatenate([planted, mx.zeros(group), mx.full((group,), 1e-4), random]).reshape(2, -1)
    return w, mx.random.normal(w.shape, key=mx.random.key(1))


def _check_kernel(key, forward: Callable, backward: Callable) -> str:
    """'' if a kernel reproduces the MLX reference on a probe, else what went wrong. key: a
    QuantSpec (the affine grid: forward(w, α), backward(w, α, g)) or a float format's mode
    (forward(w), backward(w, g))."""
    if isinstance(key, str):
        arguments = _fp_probe(key)
        inputs, ref_forward, ref_backward = arguments[:1], *_mlx_fp_backend(key)
    else:
        arguments = _probe(key)
        inputs, ref_forward, ref_backward = arguments[:2], *_mlx_backend(key)
    try:
        got = [forward(*inputs), backward(*arguments)]
        got = [got[0], *got[1]] if isinstance(got[1], tuple) else got
        mx.eval(got)
    except Exception as e:  # a kernel that does not compile, load or launch here
        return f"{type(e).__name__}: {e}"
    want = [ref_forward(*inputs), ref_backward(*arguments)]
    want = [want[0], *want[1]] if isinstance(want[1], tuple) else want
    exact = all(mx.array_equal(a, b).item() for a, b in zip(got[:2], want[:2]))  # ŵ and dw: bit for bit
    if not (exact and all(mx.allclose(a, b, rtol=1e-4, atol=1e-6).item() for a, b in zip(got[2:], want[2:]))):
        return "its results differ from the MLX reference"
    return ""


def checked_kernel(key, backend: str) -> Tuple[Optional[tuple], str]:
    """(the backend's (forward, backward), '') if it builds here and agrees with the reference,
    else (None, what went wrong). key: a QuantSpec, or a float format's mode."""
    make = FP_BACKENDS if isinstance(key, str) else BACKENDS
    try:
        forward, backward = make[backend](key)
        problem = _check_kernel(key, forward, backward)
    except RuntimeError as e:  # it cannot be built here
        return None, str(e)
    return (None, problem) if problem else ((forward, backward), "")


def _kernel(key, backend: str) -> tuple:
    """The backend's (forward, backward), or the reference with a warning if that kernel
    cannot be built here or disagrees with the reference."""
    reference = _mlx_fp_backend if isinstance(key, str) else _mlx_backend
    if backend == "mlx":
        return reference(key)
    kernel, problem = checked_kernel(key, backend)
    if kernel:
        return kernel
    warnings.warn(f"mlx_qat: the {backend} fake-quant kernel for {key} is not usable ({problem}); using the "
                  f"MLX-ops path instead. Set {BACKEND_ENV_VAR}=mlx to skip the kernels.", stacklevel=4)
    return reference(key)


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


@functools.lru_cache(maxsize=None)
def _fp_op(mode: str, backend: str):
    forward, backward = _kernel(mode, backend)

    @mx.custom_function
    def op(w):
        return forward(w)

    @op.vjp
    def op_vjp(w, cotangent, output):  # with one argument MLX passes it (and wants) bare
        return backward(w, cotangent)

    return op


def fake_quant_fp(w: mx.array, mode: str, backend: str = None) -> mx.array:
    """Quantize-dequantize W [out, in] in the float format `mode` (mxfp4, nvfp4, mxfp8): MLX's
    own quantize -> dequantize, bit for bit (fp_formats.fake_quant_fp is the reference), the scale
    derived from each group's amax. Backward: straight-through, dw = g where the element is not
    clipped to the format's largest value (fp_formats.ste_mask)."""
    group = fp_formats.FORMATS[mode][0]
    if w.ndim != 2 or w.shape[1] % group:
        raise ValueError(f"fake_quant_fp needs W [out, in] with in a multiple of {mode}'s group of {group}; got {w.shape}")
    return _fp_op(mode, backend or select_backend())(w)
