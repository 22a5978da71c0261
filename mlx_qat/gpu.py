"""Fake-quant GPU kernels (Metal, CUDA) built from one shared body per direction.

kernels/fake_quant.h holds the per-element arithmetic once and kernels/fake_quant_{forward,
backward}.inc index one element per thread; kernels/{metal,cuda}.h are the per-backend
preambles (rint, clamp, exactly rounded arithmetic). Each kernel object is built once per
backend and direction and cached; MLX caches the compiled variants per template (quantizer
kind and clip levels from the spec's `Quantizer`, group size, shape, dtype).
"""

import functools
from importlib.resources import files
from typing import Tuple

import mlx.core as mx

from .quantizers import QuantSpec, gradient_scale

THREADS = 256
# Each backend's thread index, placed at the top of the kernel source (not the header): MLX adds
# Metal's thread_position_in_grid to the signature only when the source names it.
INDEX = {
    "metal": "uint elem = thread_position_in_grid.x;",
    "cuda": "uint elem = blockIdx.x * blockDim.x + threadIdx.x;",
}


def source(name: str) -> str:
    return files("mlx_qat.kernels").joinpath(name).read_text()


def header(backend: str) -> str:
    """The backend's preamble followed by the shared per-element math."""
    return source(f"{backend}.h") + source("fake_quant.h") + source("fp_quant.h")


# (kernel, direction) -> (input names, output names): the affine grid's kernels and the float formats'
ARGUMENTS = {
    ("fake_quant", "forward"): (["w", "alpha"], ["out"]),
    ("fake_quant", "backward"): (["w", "alpha", "cotangent"], ["dw", "dalpha_elem"]),
    ("fp_quant", "forward"): (["w"], ["out"]),
    ("fp_quant", "backward"): (["w", "cotangent"], ["dw"]),
}


@functools.lru_cache(maxsize=None)
def build(backend: str, direction: str, kernel: str = "fake_quant"):
    """The kernel object for 'metal' or 'cuda', 'forward' or 'backward', and 'fake_quant' (the
    affine grid) or 'fp_quant' (a float format), built once."""
    make = {"metal": mx.fast.metal_kernel, "cuda": mx.fast.cuda_kernel}[backend]
    inputs, outputs = ARGUMENTS[kernel, direction]
    return make(
        name=f"mlx_qat_{kernel}_{direction}",
        input_names=inputs,
        output_names=outputs,
        source=INDEX[backend] + "\n" + source(f"{kernel}_{direction}.inc"),
        header=header(backend),
    )


def template(spec: QuantSpec, w: mx.array) -> list:
    out_features, in_features = w.shape
    group = spec.group_size_for(in_features)
    return [("T", w.dtype), ("KIND", spec.quantizer.kernel_id), ("QN", spec.qn), ("QP", spec.qp), ("GROUP", group),
            ("IN_FEATURES", in_features), ("N_GROUPS", in_features // group), ("N", w.size)]


def backend(name: str, spec: QuantSpec) -> Tuple:
    """(forward, backward) for fake_quant.BACKENDS, running the `name` ('metal'/'cuda') kernels."""
    forward_kernel, backward_kernel = build(name, "forward"), build(name, "backward")
    def forward(w, alpha):
        alpha = alpha.astype(mx.float32)
        (out,) = forward_kernel(inputs=[w, alpha], template=template(spec, w), grid=(w.size, 1, 1),
                                threadgroup=(THREADS, 1, 1), output_shapes=[w.shape], output_dtypes=[w.dtype])
        return out

    def backward(w, alpha, g):
        dw, elem = backward_kernel(inputs=[w, alpha.astype(mx.float32), g.astype(w.dtype)], template=template(spec, w),
                                   grid=(w.size, 1, 1), threadgroup=(THREADS, 1, 1),
                                   output_shapes=[w.shape, w.shape], output_dtypes=[w.dtype, mx.float32])
        groups = alpha.shape[1]
        dalpha = elem.reshape(w.shape[0], groups, -1).sum(axis=-1) * gradient_scale(w.size, spec)
        return dw, dalpha.astype(alpha.dtype)

    return forward, backward


def fp_backend(name: str, mode: str) -> Tuple:
    """(forward, backward) of the float format `mode` for fakequant's FP op, on the `name` kernels."""
    from .fp_formats import FORMATS, KERNEL_IDS

    forward_kernel, backward_kernel = build(name, "forward", "fp_quant"), build(name, "backward", "fp_quant")

    def constants(w):
        return [("T", w.dtype), ("FMT", KERNEL_IDS[mode]), ("GROUP", FORMATS[mode][0]), ("N", w.size)]

    def forward(w):
        (out,) = forward_kernel(inputs=[w], template=constants(w), grid=(w.size, 1, 1), threadgroup=(THREADS, 1, 1),
                                output_shapes=[w.shape], output_dtypes=[w.dtype])
        return out

    def backward(w, g):
        (dw,) = backward_kernel(inputs=[w, g.astype(w.dtype)], template=constants(w), grid=(w.size, 1, 1),
                                threadgroup=(THREADS, 1, 1), output_shapes=[w.shape], output_dtypes=[w.dtype])
        return dw

    return forward, backward
