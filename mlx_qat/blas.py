"""Give MLX's Linux CPU backend an optimized BLAS.

The Linux CPU wheel of MLX links the reference BLAS, whose unblocked loops leave a float32
matmul far from the machine's speed. Loading an optimized CBLAS with RTLD_GLOBAL *before*
`mlx.core` is first imported makes the dynamic linker resolve MLX's `cblas_*` calls to it
instead (the measured gain is in docs/PERFORMANCE.md).

Sources, in order: the library named by $MLX_QAT_BLAS ("none" disables the search), an MKL or
OpenBLAS inside the active Python environment, the system's OpenBLAS.
"""

import ctypes
import ctypes.util
import glob
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Optional

ENV_VAR = "MLX_QAT_BLAS"

INSTALL_FIX = (
    "install an optimized BLAS (`pip install mkl` on x86-64, or `apt-get install "
    "libopenblas0-pthread`), or set MLX_QAT_BLAS=/path/to/libopenblas.so"
)
ORDER_FIX = "import mlx_qat before mlx (or anything that imports mlx) in this process"

# The library loaded by `load()`, or None when MLX runs on what it was built with.
loaded: Optional[str] = None
_warned = False


def _environment_candidates() -> list:
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix])
    patterns = ["lib/libmkl_rt.so*", "lib/libopenblas*.so*"]
    return sorted(p for prefix in prefixes for pat in patterns for p in glob.glob(f"{prefix}/{pat}"))


def _system_candidates() -> list:
    found = [
        *glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so*"),
        *glob.glob("/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so*"),
        *glob.glob("/usr/lib64/libopenblas*.so*"),
    ]
    name = ctypes.util.find_library("openblas")
    return found + ([name] if name else [])


def candidates() -> list:
    """Libraries to try, best first."""
    explicit = os.environ.get(ENV_VAR)
    if explicit:
        return [] if explicit.lower() == "none" else [explicit]
    return _environment_candidates() + _system_candidates()


def _try_load(path: str) -> bool:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return hasattr(lib, "cblas_sgemm")


def _warn(message: str, fix: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"mlx_qat: {message}; MLX matmuls will be ~40x slower. Fix: {fix}.", stacklevel=3)


def load() -> Optional[str]:
    """Load the first working CBLAS from `candidates()`; return its path (None off Linux)."""
    global loaded
    if loaded or platform.system() != "Linux":
        return loaded
    if "mlx.core" in sys.modules:
        _warn("mlx.core was imported before mlx_qat, so its reference BLAS is already bound", ORDER_FIX)
        return None
    if os.environ.get(ENV_VAR, "").lower() == "none":
        return None
    for path in candidates():
        if _try_load(path):
            loaded = str(Path(path).resolve())
            return loaded
    _warn("no optimized CBLAS found", INSTALL_FIX)
    return None


def describe() -> str:
    """A human-readable name of the BLAS that MLX's CPU matmul uses."""
    if platform.system() == "Darwin":
        return "Accelerate"
    if loaded:
        return loaded
    return "reference BLAS bundled with mlx (slow)"
