"""The optimized BLAS (MKL or OpenBLAS in place of the reference BLAS of MLX's Linux wheel) is found and used."""

import platform
import subprocess
import sys

import pytest

from mlx_qat import blas


@pytest.mark.skipif(platform.system() != "Linux", reason="the BLAS swap is for MLX's Linux CPU wheel")
def test_info_reports_an_optimized_blas():
    out = subprocess.run([sys.executable, "-m", "mlx_qat.info", "--size", "512"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.splitlines() if l.startswith("blas"))
    assert "reference" not in line, out
    assert "mkl" in line or "openblas" in line, out
    gflops = float(next(l for l in out.splitlines() if l.startswith("matmul")).split()[1])
    assert gflops > 20, out  # the reference BLAS manages ~4


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
    matmul = ("import time; a = mx.random.normal((512, 512)); mx.eval(a @ a); t = time.perf_counter(); "
              "[mx.eval(a @ a) for _ in range(10)]; print(20 * 512**3 / (time.perf_counter() - t) / 1e9)")
    code = f"import mlx_qat; import mlx.core as mx; {MAPPED_BLAS}; {matmul}"
    with_mlx = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, mlx_in, mapped, gflops = with_mlx.stdout.split()
    assert loaded != "None" and ("mkl" in loaded or "openblas" in loaded), with_mlx.stdout + with_mlx.stderr
    assert (mlx_in, mapped) == ("True", "True")
    assert float(gflops) > 20, with_mlx.stdout  # MLX's matmul runs on it: the reference BLAS manages ~4


def test_qat_names_are_imported_on_first_use():
    code = ("import sys, mlx_qat; before = 'mlx_qat.fakequant' in sys.modules; "
            "from mlx_qat import QuantSpec, fake_quant; print(before, QuantSpec.__module__, fake_quant.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "mlx_qat.quantizers", "mlx_qat.fakequant"]
