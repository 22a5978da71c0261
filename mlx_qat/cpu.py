"""The fused CPU fake-quant kernel: kernels/cpu.cpp built as an MLX extension.

MLX runs compiled CPU elementwise graphs one scalar at a time on one thread; this kernel runs
the shared per-element math of kernels/fake_quant.h vectorized (large weights on every core), in
one pass each way: forward ŵ = scale·code(w / α) + bias; backward dw = g·pass(x) and
dα = s·Σ_group g·∂q/∂α(x). Its `forward(w, alpha, kind, qn, qp)` and
`backward(w, alpha, g, kind, qn, qp, s)` take the kind as the spec's `Quantizer.kernel_id`.

It is compiled on first use with the host C++ compiler for this machine (so it may use every
vector instruction the CPU has) against the installed MLX and nanobind, and cached under
~/.cache/mlx_qat/kernels (or $MLX_QAT_CACHE/kernels), keyed by everything that goes into it.
Where it cannot be built, fakequant.py falls back to the MLX-ops path with a warning.
"""

import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib.resources import files
from pathlib import Path
from types import ModuleType

import mlx.core as mx
from tqdm import tqdm

MODULE = "_fake_quant_cpu"
SOURCES = ("host.h", "fake_quant.h", "fp_quant.h", "cpu.cpp")
CACHE_ENV_VAR = "MLX_QAT_CACHE"
FIX = ("install a C++ compiler (`apt-get install g++`, or `xcode-select --install` on a Mac) and "
       "`pip install nanobind`, or set MLX_QAT_FAKE_QUANT=mlx to use the MLX-ops path")


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not found:
        raise RuntimeError(f"no C++ compiler found to build the fused CPU fake-quant kernel: {FIX}")
    return found


def flags() -> list:
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fvisibility=hidden",
             # Bit-exact with the MLX reference: no a*b+c contraction, no fast math.
             "-ffp-contract=off", "-fopenmp-simd",
             "-DNDEBUG", "-DNB_COMPACT_ASSERTIONS", "-DNB_DOMAIN=mlx"]  # MLX's nanobind domain
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")  # built where it runs: use the widest vectors this CPU has
    if sys.platform == "darwin":
        flags.append("-Wl,-undefined,dynamic_lookup")  # Python's symbols come from the interpreter
    return flags


def _nanobind():
    try:
        import nanobind
    except ImportError:
        raise RuntimeError(f"nanobind is not installed, so the fused CPU fake-quant kernel cannot be built: {FIX}")
    return nanobind


def command(source_dir: Path, out: Path) -> list:
    """Compile and link our kernel and nanobind's runtime into one Python extension."""
    mlx_dir = Path(mx.__file__).parent
    nb_dir = Path(_nanobind().include_dir()).parent
    includes = [source_dir, nb_dir / "include", nb_dir / "ext" / "robin_map" / "include",
                sysconfig.get_paths()["include"], mlx_dir / "include"]
    return [compiler(), *flags(), *[f"-I{p}" for p in includes], str(source_dir / "cpu.cpp"),
            str(nb_dir / "src" / "nb_combined.cpp"),
            f"-L{mlx_dir / 'lib'}", "-lmlx", f"-Wl,-rpath,{mlx_dir / 'lib'}", "-o", str(out)]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV_VAR) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_qat"
    return Path(root) / "kernels"


def cpu_identity() -> str:
    """What -march=native compiles for: a library built on another CPU (a shared home directory)
    may use instructions this one lacks."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags", "Features"))))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def sources() -> dict:
    """The kernel's source files, name -> bytes (the package's files may live inside a wheel or zip)."""
    return {name: files("mlx_qat.kernels").joinpath(name).read_bytes() for name in SOURCES}


def build_key(texts: dict) -> str:
    """Everything the library depends on: sources, compiler, flags, which MLX (it links that
    libmlx), nanobind and Python."""
    h = hashlib.sha256()
    for text in texts.values():
        h.update(text)
    nanobind = _nanobind()
    parts = [compiler(), *flags(), mx.__version__, mx.__file__, nanobind.__version__, nanobind.__file__,
             sys.version, sysconfig.get_paths()["include"], platform.platform(), cpu_identity()]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


def build() -> Path:
    """The built library, compiling it unless this exact build is cached. Raises RuntimeError."""
    texts = sources()
    target = cache_dir() / build_key(texts) / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if target.exists():
        return target
    # tqdm.write: the first build often happens under the training progress bar.
    tqdm.write("mlx_qat: building the fused CPU fake-quant kernel (once; about 10 s)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="mlx_qat_cpu_") as scratch:
        scratch = Path(scratch)
        for name, text in texts.items():
            (scratch / name).write_bytes(text)
        try:
            result = subprocess.run(command(scratch, scratch / target.name), capture_output=True, text=True)
        except OSError as e:  # e.g. $CXX names no program
            raise RuntimeError(f"the fused CPU fake-quant kernel cannot be built: {e}; {FIX}")
        if result.returncode != 0:
            raise RuntimeError(f"the fused CPU fake-quant kernel failed to build ({FIX}):\n{result.stderr[-2000:]}")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(scratch / target.name, partial)
        os.replace(partial, target)  # atomic: concurrent builds of one key all end with a whole file
    return target


@functools.lru_cache(maxsize=None)
def _load() -> tuple:
    try:
        path = build()
        spec = importlib.util.spec_from_file_location(MODULE, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module, ""
    except RuntimeError as e:
        return None, str(e)
    except ImportError as e:
        return None, f"the fused CPU fake-quant kernel does not load ({e}); {FIX}"


def load() -> ModuleType:
    """The kernel's Python module, built on first use. Raises RuntimeError if it cannot be
    (tried once per process)."""
    module, problem = _load()
    if module is None:
        raise RuntimeError(problem)
    return module
