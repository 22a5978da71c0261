"""The optimized BLAS (MKL or OpenBLAS in place of the reference BLAS of MLX's Linux wheel) is found and used."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_qat import blas


def python(code: str, **env) -> str:
    """What `code` prints in a fresh interpreter, with `env` added to the environment."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout


MATMUL = ("import mlx_qat; from mlx_qat import blas; from mlx_qat.info import matmul_gflops; "
          "print(blas.loaded, matmul_gflops(512, repeats=5))")


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_mlx_matmuls_on_the_optimized_blas():
    """The library loaded is MKL or OpenBLAS, and MLX's matmul is several times faster on it than
    on the reference BLAS of MLX's wheel, measured here too."""
    loaded, fast = python(MATMUL, **{blas.ENV_VAR: ""}).split()
    none, slow = python(MATMUL, **{blas.ENV_VAR: "none"}).split()
    assert "mkl" in loaded or "openblas" in loaded
    assert none == "None"
    assert float(fast) > 3 * float(slow), (fast, slow)  # a margin that holds on a shared, busy machine


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_info_names_the_blas_mlx_uses():
    described = python("import mlx_qat, mlx.core; from mlx_qat import blas; print(blas.describe())").strip()
    out = subprocess.run([sys.executable, "-m", "mlx_qat.info", "--size", "64"], capture_output=True, text=True,
                         check=True).stdout
    assert f"blas       {described}" in out.splitlines() and Path(described).is_file()  # a library, not the reference


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_late_import_warns_with_the_fix():
    code = "import mlx.core, warnings; warnings.simplefilter('always'); import mlx_qat"
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "imported before mlx_qat" in err and "import mlx_qat before mlx" in err


def test_explicit_library_comes_first(monkeypatch):
    monkeypatch.setenv(blas.ENV_VAR, "/opt/lib/libmyblas.so")
    assert blas.candidates() == ["/opt/lib/libmyblas.so"]
    monkeypatch.setenv(blas.ENV_VAR, "none")
    assert blas.candidates() == []


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_missing_blas_warns_once():
    code = ("import warnings; warnings.simplefilter('always'); import mlx_qat, mlx.core, mlx.nn; "
            "print(mlx_qat.blas.loaded)")
    env = {"MLX_QAT_BLAS": "/nonexistent/libblas.so", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "None"
    assert result.stderr.count("no optimized CBLAS found") == 1


MAPPED_BLAS = ("import sys; from pathlib import Path; from mlx_qat import blas; "
               "maps = Path('/proc/self/maps').read_text(); "
               "print(blas.loaded, 'mlx' in sys.modules, any(Path(c).resolve().name in maps for c in blas.candidates()))")


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_the_blas_loads_when_mlx_is_imported_not_before():
    alone = subprocess.run([sys.executable, "-c", f"import mlx_qat; {MAPPED_BLAS}"], capture_output=True, text=True, check=True)
    assert alone.stdout.split() == ["None", "False", "False"], alone.stdout + alone.stderr
    code = f"import mlx_qat; import mlx.core as mx; {MAPPED_BLAS}"
    with_mlx = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, mlx_in, mapped = with_mlx.stdout.split()
    assert loaded != "None" and ("mkl" in loaded or "openblas" in loaded), with_mlx.stdout + with_mlx.stderr
    assert (mlx_in, mapped) == ("True", "True")


def test_qat_names_are_imported_on_first_use():
    code = ("import sys, mlx_qat; before = 'mlx_qat.fakequant' in sys.modules; "
            "from mlx_qat import QuantSpec, fake_quant; print(before, QuantSpec.__module__, fake_quant.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "mlx_qat.quantizers", "mlx_qat.fakequant"]
