"""mlx_qat: compute-optimal quantization-aware training of low-bit language models with MLX."""

from . import blas

blas.load()  # before mlx.core is first imported (see blas.py)

try:
    from .fakequant import fake_quant
    from .quantizers import QuantSpec, init_scale
except ImportError:  # no MLX here: the planning modules (law, fit, plan) still work
    pass

__all__ = ["QuantSpec", "fake_quant", "init_scale"]
__version__ = "0.1.0"
