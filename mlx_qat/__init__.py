"""mlx_qat: compute-optimal quantization-aware training of low-bit language models with MLX."""

from . import blas

blas.load()  # before mlx.core is first imported (see blas.py)

from .fake_quant import fake_quant  # noqa: E402
from .quantizers import QuantSpec, init_scale  # noqa: E402

__all__ = ["QuantSpec", "fake_quant", "init_scale"]
__version__ = "0.1.0"
