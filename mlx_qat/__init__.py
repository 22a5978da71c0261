"""mlx_qat: compute-optimal quantization-aware training of low-bit language models with MLX."""

from . import blas

blas.load()  # before mlx.core is first imported (see blas.py)

__all__ = ["QuantSpec", "fake_quant", "init_scale"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use, so that the planning modules (law, fit, plan) work without MLX.
    if name == "fake_quant":
        from .fake_quant import fake_quant

        return fake_quant
    if name in ("QuantSpec", "init_scale"):
        from . import quantizers

        return getattr(quantizers, name)
    raise AttributeError(f"module 'mlx_qat' has no attribute {name!r}")
