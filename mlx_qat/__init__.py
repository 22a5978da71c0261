"""mlx_qat: compute-optimal quantization-aware training of low-bit language models with MLX.

Importing the package loads nothing heavy: the optimized BLAS is loaded just before MLX is first
imported (see blas.py), and the QAT names below are imported on first use, so the planning
modules (scaling_law, fit, plan) run with numpy and scipy alone.
"""

import importlib
import sys

from . import blas

__all__ = ["QuantSpec", "fake_quant", "init_scale"]
__version__ = "0.1.0"

_LAZY = {"QuantSpec": "quantizers", "fake_quant": "fakequant", "init_scale": "quantizers"}


class _BlasBeforeMLX:
    """A meta-path finder that finds nothing: it loads the BLAS when `mlx` is first imported,
    then lets the usual finders import it. It stays in sys.meta_path (removing a finder while
    the import system iterates that list would skip the next one) but acts once."""

    fired = False

    def find_spec(self, name, path=None, target=None):
        if not self.fired and (name == "mlx" or name.startswith("mlx.")):
            self.fired = True
            blas.load()
        return None


if sys.modules.get("mlx") is not None or sys.modules.get("mlx.core") is not None:
    blas.load()  # mlx came first: load now (blas.load warns if mlx.core already bound its own BLAS)
elif not any(isinstance(f, _BlasBeforeMLX) for f in sys.meta_path):
    sys.meta_path.insert(0, _BlasBeforeMLX())


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
