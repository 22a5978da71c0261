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
    return source(f"{backend}.h") + source("fake_quant.h")


@functools.lru_cache(maxsize=None)
def build(backend: str, direction: str):
    """The kernel object for 'metal' or 'cuda' and 'forward' or 'backward' (built once)."""
    make = {"metal": mx.fast.metal_kernel, "cuda": mx.fast.cuda_kernel}[backend]
    inputs, outputs = (["w", "alpha"], ["out"]) if direction == "forward" else (["w", "alpha", "cotangent"], ["dw", "dalpha_elem"])
    return make(
        name=f"mlx_qat_fake_quant_{direction}",
        input_names=inputs,
        output_names=outputs,
        source=INDEX[backend] + "\n" + source(f"fake_quant_{direction}.inc"),
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
