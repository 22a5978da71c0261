"""OpenBLAS on one thread, for the law's fit: numpy only, through ctypes.

Each L-BFGS-B iteration on the law's 16 parameters makes a few tiny BLAS calls, which scipy's
OpenBLAS still hands to its threads; when training keeps the cores busy those threads wait for
one, and the fit stalls (the measured cost is in benchmarks/results/fit.json).
"""

import ctypes
import itertools
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Tuple


def openblas_thread_controls() -> List[Tuple]:
    """(get, set) of the thread count of each OpenBLAS in this process (numpy's and scipy's
    wheels each bundle one). Linux only: elsewhere numpy uses Accelerate or its BLAS as built."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    controls = []
    for path in sorted({line.split(maxsplit=5)[-1] for line in maps.splitlines() if "openblas" in line.lower()}):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)  # already loaded: this only finds it
        except OSError:
            continue
        for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_")):
            get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
            if get and set_:
                controls.append((get, set_))
                break
    return controls


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run OpenBLAS on one thread inside the block."""
    controls = openblas_thread_controls()
    before = [get() for get, _ in controls]
    for _, set_ in controls:
        set_(1)
    try:
        yield
    finally:
        for (_, set_), n in zip(controls, before):
            set_(n)
