"""The Metal/CUDA kernel bodies, run on the CPU through a host C++ shim, against the MLX reference.

The same .inc files are what gpu.py hands to mx.fast.metal_kernel / mx.fast.cuda_kernel; only the
preamble differs. float32 must match exactly; float16 too (one rounding of the same float).
"""

import ctypes
import warnings
import shutil
import subprocess
from importlib.resources import files

import mlx.core as mx
import numpy as np
import pytest

from mlx_qat import QuantSpec, fake_quant
from mlx_qat import fp_formats, gpu
from mlx_qat.fakequant import BACKEND_ENV_VAR, available_backends, fake_quant_fp, select_backend
from mlx_qat.quantizers import MIN_SCALE, QUANTIZERS, grouped, straight_through

ALL_BITS = [1, 1.58, 2, 3, 4, 5, 6, 8]
GRANULARITIES = [32, 64, 128, None]
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    if COMPILER is None:
        pytest.skip("no C++ compiler on this machine: the kernel bodies cannot be emulated")
    src = files("mlx_qat.kernels")
    lib = tmp_path_factory.mktemp("kernels") / "fake_quant_host.so"
    subprocess.run([COMPILER, "-O2", "-ffp-contract=off", "-shared", "-fPIC", f"-I{src}", "-o", str(lib),
                    str(src.joinpath("host_emulation.cpp"))], check=True)
    return ctypes.CDLL(str(lib))


def kernel_inputs(bits, group_size, dtype=np.float32, seed=0, any_scale=False):
    """Weights whose x = w/α hits rounding ties, clip edges and zero, plus random values.
    Power-of-two α keep x exact; any_scale draws α from [0.05, 2) (x rounds, the grid's
    scale and bias are inexact)."""
    rng = np.random.default_rng(seed)
    out_features, in_features = 6, 256
    spec = QuantSpec(bits, group_size)
    groups = 1 if group_size is None else in_features // group_size
    alpha = (rng.uniform(0.05, 2, size=(out_features, groups)) if any_scale
             else 2.0 ** rng.integers(-3, 3, size=(out_features, groups))).astype(np.float32)
    alpha[0, 0] = 0.0  # clamped to 1e-5
    special = np.array([0, 0.5, -0.5, 1.5, -1.5, 2.5, 0.99, -0.99, 1.0, -1.0, 0.25, 0.75, -0.25,
                        spec.qp, spec.qn, spec.qp + 0.5, spec.qn - 0.5, spec.qp + 1, spec.qn - 1], dtype=np.float32)
    x = rng.uniform(spec.qn - 2, spec.qp + 2, size=(out_features, in_features)).astype(np.float32)
    x[:, : len(special)] = special
    a_full = np.repeat(alpha, in_features // groups, axis=1)
    w = (x * np.maximum(a_full, MIN_SCALE)).astype(dtype)
    g = rng.normal(size=w.shape).astype(dtype)
    return spec, w, alpha, g


def constants(spec, w):
    """The kernels' template constants, in host_emulation.cpp's order, as gpu.template gives them."""
    template = dict(gpu.template(spec, mx.array(w)))
    return [template[k] for k in ("KIND", "QN", "QP", "GROUP", "IN_FEATURES", "N_GROUPS", "N")]


def run_host(host, suffix, spec, w, alpha, g):
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    out, dw, elem = np.empty_like(w), np.empty_like(w), np.empty(w.shape, np.float32)
    getattr(host, f"forward_{suffix}")(ptr(w), ptr(alpha), ptr(out), *constants(spec, w))
    getattr(host, f"backward_{suffix}")(ptr(w), ptr(alpha), ptr(g), ptr(dw), ptr(elem), *constants(spec, w))
    return out, dw, elem


def reference(spec, w, alpha, g):
    """The MLX path: fake_quant and its VJP, and the per-element α contribution g·unit."""
    w, alpha, g = mx.array(w), mx.array(alpha), mx.array(g)
    out, vjp = mx.vjp(lambda w, a: fake_quant(w, a, spec, backend="mlx"), [w, alpha], [g])
    a = mx.maximum(alpha, MIN_SCALE)[..., None]
    _, unit = straight_through(grouped(w, spec).astype(mx.float32) / a, spec)
    elem = (grouped(g, spec).astype(mx.float32) * unit).reshape(w.shape)
    return np.array(out[0]), np.array(vjp[0]), np.array(elem)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
def test_shared_body_matches_mlx_float32(host, bits, group_size):
    spec, w, alpha, g = kernel_inputs(bits, group_size)
    out, dw, elem = run_host(host, "f32", spec, w, alpha, g)
    ref_out, ref_dw, ref_elem = reference(spec, w, alpha, g)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(dw, ref_dw)
    np.testing.assert_array_equal(elem, ref_elem)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_shared_body_matches_mlx_with_any_scale(host, bits):
    spec, w, alpha, g = kernel_inputs(bits, 64, seed=2, any_scale=True)
    for got, want in zip(run_host(host, "f32", spec, w, alpha, g), reference(spec, w, alpha, g)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_shared_body_matches_mlx_float16(host, bits):
    if not hasattr(host, "forward_f16"):
        pytest.skip("this C++ compiler has no _Float16")
    spec, w, alpha, g = kernel_inputs(bits, 64, dtype=np.float16, seed=1)
    out, dw, elem = run_host(host, "f16", spec, w, alpha, g)
    ref_out, ref_dw, ref_elem = reference(spec, w, alpha, g)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(dw, ref_dw)
    np.testing.assert_array_equal(elem, ref_elem)


def fp_inputs(mode: str, seed: int = 0) -> np.ndarray:
    """Weights [8, 256] whose groups cover the float formats' cases: amax over many binades, a
    group with amax = the largest element (scale 1) holding rounding ties of the format, an
    all-zero group, tiny values (nvfp4's E4M3 scale rounds to 0), outliers."""
    rng = np.random.default_rng(seed)
    group, _, _ = fp_formats.FORMATS[mode]
    w = rng.normal(size=(8, 256)) * 2.0 ** rng.integers(-12, 6, size=(8, 256 // group)).repeat(group, axis=1)
    top = fp_formats.element_max(mode)
    ties = ([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.1, 5.9] if top == 6 else
            [1.0625, 1.1875, 5.0 / 1024, 0.015625 + 1 / 1024, 440.0, 304.0, 17.0, 0.001])  # E4M3 ties, and not
    values, cells = ties + [-t for t in ties], []
    for i in range(0, len(values), group - 1):  # each group led by `top`, so its scale is 1
        chunk = values[i:i + group - 1]
        cells += [top, *chunk] + [0.0] * (group - 1 - len(chunk))
    w[0, :len(cells)] = cells
    w[1, :group] = 0.0
    w[2, :group] = rng.normal(size=group) * 1e-4
    w[3, :group] = rng.normal(size=group) * 1e-2
    w[3, 5] = 50.0  # one outlier sets the group's scale
    return w.astype(np.float32)


@pytest.mark.parametrize("mode", list(fp_formats.FORMATS))
def test_float_format_body_matches_mlx(host, mode):
    w = fp_inputs(mode)
    g = np.random.default_rng(1).normal(size=w.shape).astype(np.float32)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731
    out, dw = np.empty_like(w), np.empty_like(w)
    constants = (fp_formats.KERNEL_IDS[mode], fp_formats.FORMATS[mode][0], w.size)
    host.fp_forward_f32(ptr(w), ptr(out), *constants)
    host.fp_backward_f32(ptr(w), ptr(g), ptr(dw), *constants)
    want = mx.dequantize(*mx.quantize(mx.array(w), mode=mode), mode=mode, dtype=mx.float32)
    np.testing.assert_array_equal(out, np.array(want))  # MLX's own quantize -> dequantize, bit for bit
    np.testing.assert_array_equal(dw, np.where(np.array(fp_formats.ste_mask(mx.array(w), mode)), g, 0))


def test_preambles_define_what_the_bodies_use():
    bodies = "".join(gpu.source(f"{kind}{part}") for kind in ("fake_quant", "fp_quant")
                     for part in (".h", "_forward.inc", "_backward.inc"))
    for name in ("FN", "ABS", "RINT", "CLAMP", "MUL", "ADD", "SUB", "DIV", "AS_UINT", "AS_FLOAT", "LDEXP"):
        assert name in bodies
        for preamble in ("metal.h", "cuda.h", "host.h"):
            assert f"#define {name}" in gpu.source(preamble), (preamble, name)
    # MLX builds Metal's signature from the names the source uses, so the index must be there.
    assert "thread_position_in_grid" in gpu.INDEX["metal"]


def test_kernels_are_built_once(monkeypatch):
    calls = []
    monkeypatch.setattr(mx.fast, "metal_kernel", lambda **kw: calls.append(kw) or object())
    gpu.build.cache_clear()
    try:
        for _ in range(3):
            gpu.build("metal", "forward")
            gpu.build("metal", "backward")
            gpu.build("metal", "forward", "fp_quant")
            gpu.build("metal", "backward", "fp_quant")
    finally:
        gpu.build.cache_clear()
    assert [c["name"] for c in calls] == ["mlx_qat_fake_quant_forward", "mlx_qat_fake_quant_backward",
                                          "mlx_qat_fp_quant_forward", "mlx_qat_fp_quant_backward"]
    assert calls[0]["header"] == gpu.source("metal.h") + gpu.source("fake_quant.h") + gpu.source("fp_quant.h")
    assert calls[0]["source"] == gpu.INDEX["metal"] + "\n" + gpu.source("fake_quant_forward.inc")
    assert calls[1]["input_names"] == ["w", "alpha", "cotangent"] and calls[1]["output_names"] == ["dw", "dalpha_elem"]
    assert calls[2]["source"] == gpu.INDEX["metal"] + "\n" + gpu.source("fp_quant_forward.inc")
    assert calls[3]["input_names"] == ["w", "cotangent"] and calls[3]["output_names"] == ["dw"]


def test_dispatch(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert select_backend() == ("cpu" if mx.default_device() == mx.cpu else available_backends()[-1])
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert select_backend() == "metal"
    monkeypatch.setenv(BACKEND_ENV_VAR, "mlx")
    assert select_backend() == "mlx"
    monkeypatch.setenv(BACKEND_ENV_VAR, "cuda")
    if not mx.cuda.is_available():
        with pytest.raises(ValueError, match="not available here"):
            select_backend()


@pytest.mark.skipif(not (mx.metal.is_available() or mx.cuda.is_available()), reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_gpu_kernel_matches_reference(bits, group_size, dtype):
    spec, w, alpha, g = kernel_inputs(bits, group_size)
    w, alpha, g = mx.array(w).astype(dtype), mx.array(alpha), mx.array(g).astype(dtype)
    name = available_backends()[-1]
    f = lambda backend: mx.vjp(lambda w, a: fake_quant(w, a, spec, backend=backend), [w, alpha], [g])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that fails its self-check must fail here, not fall back
        (out, ), (dw, dalpha) = f(name)
    with mx.stream(mx.cpu):
        (ref_out, ), (ref_dw, ref_dalpha) = f("mlx")
    exact = dtype == mx.float32
    assert mx.array_equal(out, ref_out).item() if exact else mx.allclose(out, ref_out, atol=1e-2).item()
    assert mx.array_equal(dw, ref_dw).item()
    assert mx.allclose(dalpha, ref_dalpha, rtol=1e-4, atol=1e-6).item()


def cuda_translation_unit() -> str:
    """The CUDA kernels as MLX's cuda_kernel wraps them (header, signature, index line, body),
    instantiated for every kind and weight type."""
    signatures = {
        "forward": "const T* w, const float* alpha, T* out",
        "backward": "const T* w, const float* alpha, const T* cotangent, T* dw, float* dalpha_elem",
    }
    template = "template <typename T, int KIND, int QN, int QP, int GROUP, int IN_FEATURES, int N_GROUPS, int N>"
    parts = ["#include <cuda_fp16.h>", "#include <cuda_bf16.h>", gpu.header("cuda")]
    for direction, params in signatures.items():
        body = gpu.source(f"fake_quant_{direction}.inc")
        parts.append(f"{template}\n__global__ void fake_quant_{direction}({params}) {{\n{gpu.INDEX['cuda']}\n{body}\n}}")
    for t in ("float", "__half", "__nv_bfloat16"):
        for q in QUANTIZERS:
            args = f"{t}, {q.kernel_id}, {', '.join(map(str, q.levels(q.bits[0])))}, 64, 256, 4, 1024"
            for direction, params in signatures.items():
                parts.append(f"template __global__ void fake_quant_{direction}<{args}>({params.replace('T*', t + '*')});")
    return "\n".join(parts) + "\n"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here: the CUDA source cannot be compiled")
def test_cuda_source_compiles_without_fma(tmp_path):
    src = tmp_path / "fake_quant.cu"
    src.write_text(cuda_translation_unit())
    result = subprocess.run(["nvcc", "-ptx", "-arch=sm_90", "-o", str(tmp_path / "fq.ptx"), str(src)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ptx = (tmp_path / "fq.ptx").read_text()
    assert ptx.count(".entry") == 24  # 2 directions x 4 kinds x 3 weight types
    # Contracted multiply-adds would round once where the MLX reference rounds twice.
    assert "fma.rn.f32" not in ptx and "mad.f32" not in ptx
    assert "mul.rn.f32" in ptx and "div.rn.f32" in ptx


def test_kernels_are_checked_against_the_reference(monkeypatch):
    """A kernel that computes something else (or fails to build) is replaced, with a warning."""
    from mlx_qat import fakequant as fq

    spec = QuantSpec(2, 64)
    w = mx.random.normal((8, 128), key=mx.random.key(2))
    alpha = mx.full((8, 2), 0.5)
    reference = fake_quant(w, alpha, spec, backend="mlx")

    def wrong(spec):
        forward, backward = fq._mlx_backend(spec)
        return (lambda w, a: forward(w, a) * 1.001), backward

    def broken(spec):
        def fail(*args):
            raise RuntimeError("kernel did not compile")
        return fail, fail

    def unbuildable(spec):
        raise RuntimeError("no C++ compiler found")

    def faithful(spec):
        return fq._mlx_backend(spec)

    cases = (("wrong", wrong, "differ"), ("broken", broken, "did not compile"),
             ("unbuildable", unbuildable, "no C++ compiler"), ("faithful", faithful, None))
    for name, make, should_warn in cases:
        monkeypatch.setitem(fq.BACKENDS, name, make)
        fq._op.cache_clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fake_quant(w, alpha, spec, backend=name)
        messages = [str(c.message) for c in caught]
        assert mx.array_equal(out, reference).item()  # the fallback (or the good kernel) is exact
        if should_warn:
            assert any(should_warn in m and "MLX-ops path instead" in m for m in messages), messages
        else:
            assert not messages
    fq._op.cache_clear()


def test_float_format_kernels_are_checked_against_the_reference(monkeypatch):
    from mlx_qat import fakequant as fq

    w = mx.random.normal((8, 64), key=mx.random.key(2))
    reference = fq.fake_quant_fp(w, "mxfp4", backend="mlx")

    def wrong(mode):
        forward, backward = fq._mlx_fp_backend(mode)
        return (lambda w: forward(w) * 1.001), backward

    monkeypatch.setitem(fq.FP_BACKENDS, "wrong", wrong)
    fq._fp_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="the wrong fake-quant kernel for mxfp4 is not usable .*differ"):
            out = fq.fake_quant_fp(w, "mxfp4", backend="wrong")
    finally:
        fq._fp_op.cache_clear()
    assert mx.array_equal(out, reference).item()


@pytest.mark.skipif(not (mx.metal.is_available() or mx.cuda.is_available()), reason="needs a Metal or CUDA GPU")
@pytest.mark.parametrize("mode", list(fp_formats.FORMATS))
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_gpu_float_format_kernel_matches_reference(mode, dtype):
    w = mx.array(fp_inputs(mode)).astype(dtype)
    g = mx.random.normal(w.shape, key=mx.random.key(3)).astype(dtype)
    f = lambda backend: mx.vjp(lambda w: fake_quant_fp(w, mode, backend=backend), [w], [g])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (out,), (dw,) = f(available_backends()[-1])
    with mx.stream(mx.cpu):
        (ref_out,), (ref_dw,) = f("mlx")
    assert mx.array_equal(out, ref_out).item() and mx.array_equal(dw, ref_dw).item()


def test_info_names_the_path_fake_quant_takes(monkeypatch):
    from mlx_qat import fakequant as fq, info

    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(fq, "select_backend", lambda: "cpu")
    monkeypatch.setattr(info, "select_backend", lambda: "cpu")
    monkeypatch.setitem(fq.BACKENDS, "cpu", fq._mlx_backend)  # a kernel that agrees with the reference
    assert info.fake_quant_backend() == "cpu (fused kernel)"
    off = lambda spec: (lambda w, a: fq._mlx_backend(spec)[0](w, a) * 1.001, fq._mlx_backend(spec)[1])  # noqa: E731
    monkeypatch.setitem(fq.BACKENDS, "cpu", off)
    assert info.fake_quant_backend().startswith("mlx (the cpu kernel is not usable here: its results differ")
