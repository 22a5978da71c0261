"""The fused CPU kernel (mlx_qat/cpu.py, kernels/cpu.cpp) against the MLX reference.

Forward and straight-through w gradient must be bit-equal; the α gradient is summed in another
order (vector lanes), so it is compared to float32 rounding.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_qat import QuantSpec, cpu, fake_quant, fp_formats, init_scale
from mlx_qat import fakequant as fq
from mlx_qat.fakequant import fake_quant_fp

from test_kernels import ALL_BITS, GRANULARITIES, fp_inputs, kernel_inputs


@pytest.fixture(scope="module")
def kernel():
    try:
        return cpu.load()
    except RuntimeError as e:
        pytest.skip(f"the fused CPU kernel cannot be built here: {str(e).splitlines()[0]}")


def both(spec, w, alpha, g):
    """(ŵ, dw, dα) through the fused kernel and through the reference, each in a compiled VJP."""
    def run(backend):
        f = mx.compile(lambda w, a, g: mx.vjp(lambda w, a: fake_quant(w, a, spec, backend=backend), [w, a], [g]))
        (out,), (dw, dalpha) = f(w, alpha, g)
        return out, dw, dalpha
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that fails its self-check must fail here, not fall back
        return run("cpu"), run("mlx")


def assert_matches(got, want, exact=True):
    out, dw, dalpha = got
    ref_out, ref_dw, ref_dalpha = want
    assert out.dtype == ref_out.dtype and dw.dtype == ref_dw.dtype and dalpha.dtype == ref_dalpha.dtype
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), np.array(ref_out.astype(mx.float32)))
    np.testing.assert_array_equal(np.array(dw.astype(mx.float32)), np.array(ref_dw.astype(mx.float32)))
    np.testing.assert_allclose(np.array(dalpha.astype(mx.float32)), np.array(ref_dalpha.astype(mx.float32)),
                               rtol=1e-4 if exact else 1e-2, atol=1e-6)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
def test_matches_reference_float32(kernel, bits, group_size):
    spec, w, alpha, g = kernel_inputs(bits, group_size)  # ties at .5, clip edges, zero, α clamped
    assert_matches(*both(spec, mx.array(w), mx.array(alpha), mx.array(g)))


@pytest.mark.parametrize("bits", ALL_BITS)
def test_matches_reference_with_any_scale(kernel, bits):
    spec, w, alpha, g = kernel_inputs(bits, 64, seed=2, any_scale=True)
    assert_matches(*both(spec, mx.array(w), mx.array(alpha), mx.array(g)))


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("bits", [1, 1.58, 2, 4])
def test_matches_reference_half_types(kernel, dtype, bits):
    spec, w, alpha, g = kernel_inputs(bits, 32, seed=3)
    got, want = both(spec, mx.array(w).astype(dtype), mx.array(alpha), mx.array(g).astype(dtype))
    assert_matches(got, want, exact=False)


def test_large_matrix_split_across_threads(kernel):
    """Big enough for several threads (rows split mid-matrix); a per-channel width that is not a
    multiple of the vector width exercises the loop tails."""
    for spec, shape in ((QuantSpec(3, 64), (2048, 2048)), (QuantSpec(4, None), (2063, 2000))):
        w = mx.random.normal(shape, key=mx.random.key(4)) * 0.05
        alpha = init_scale(w, spec) * 0.7  # some weights clip
        g = mx.random.normal(shape, key=mx.random.key(5))
        assert_matches(*both(spec, w, alpha, g))


def test_donated_and_strided_inputs(kernel):
    """The upstream gradient computed in the graph may lend its buffer to dw; a transposed W and
    a broadcast gradient are read through copies. Results stay those of the reference."""
    spec = QuantSpec(2, 32)
    w_t = (mx.random.normal((256, 128), key=mx.random.key(6)) * 0.1).T  # strided view of [128, 256]
    alpha = mx.full((128, 8), 0.1)
    x = mx.random.normal((16, 256), key=mx.random.key(7))

    def loss(w, a, backend):
        return (x @ fake_quant(w, a, spec, backend=backend).T).square().sum()

    grads = {b: mx.grad(lambda w, a: loss(w, a, b), argnums=(0, 1))(w_t, alpha) for b in ("cpu", "mlx")}
    np.testing.assert_array_equal(np.array(grads["cpu"][0]), np.array(grads["mlx"][0]))
    np.testing.assert_allclose(np.array(grads["cpu"][1]), np.array(grads["mlx"][1]), rtol=1e-4, atol=1e-6)
    g = mx.broadcast_to(mx.array(2.0), w_t.shape)  # stride 0
    dw, _ = kernel.backward(w_t, alpha, g, spec.quantizer.kernel_id, spec.qn, spec.qp, 1.0)
    assert mx.array_equal(dw, fq._mlx_backend(spec)[1](w_t, alpha, g)[0]).item()


def fp_both(mode, w, g):
    """(ŵ, dw) of a float format through the fused kernel and through the reference, compiled VJPs."""
    def run(backend):
        f = mx.compile(lambda w, g: mx.vjp(lambda w: fake_quant_fp(w, mode, backend=backend), [w], [g]))
        (out,), (dw,) = f(w, g)
        return out, dw
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return run("cpu"), run("mlx")


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("mode", list(fp_formats.FORMATS))
def test_float_formats_match_the_reference(kernel, mode, dtype):
    """Bit for bit in every weight type: ties, saturation, zero and tiny groups, outliers; and a
    matrix large enough to be split across threads."""
    for w in (mx.array(fp_inputs(mode)), mx.random.normal((1024, 2048), key=mx.random.key(8)) * 0.05):
        w = w.astype(dtype)
        g = mx.random.normal(w.shape, key=mx.random.key(9)).astype(dtype)
        (out, dw), (ref_out, ref_dw) = fp_both(mode, w, g)
        assert out.dtype == dtype and dw.dtype == dtype
        assert mx.array_equal(out, ref_out).item() and mx.array_equal(dw, ref_dw).item()
    with pytest.raises(ValueError, match="multiple of the group"):
        kernel.fp_forward(mx.zeros((4, 40)), fp_formats.KERNEL_IDS[mode], fp_formats.FORMATS[mode][0])


def test_rejects_mismatched_shapes(kernel):
    w, spec = mx.zeros((4, 64)), QuantSpec(4, 32)
    kind = (spec.quantizer.kernel_id, spec.qn, spec.qp)
    with pytest.raises(ValueError, match="groups dividing in"):
        kernel.forward(w, mx.ones((4, 3)), *kind)
    with pytest.raises(ValueError, match="cotangent"):
        kernel.backward(w, mx.ones((4, 2)), mx.zeros((4, 32)), *kind, 1.0)


def test_build_is_cached_and_keyed_by_what_goes_into_it(kernel, monkeypatch):
    path = cpu.build()
    assert path.exists() and path.parent.name == cpu.build_key(cpu.sources())
    monkeypatch.setattr(cpu.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a cached kernel"))
    assert cpu.build() == path
    flags = cpu.flags
    monkeypatch.setattr(cpu, "flags", lambda: [*flags(), "-DOTHER"])
    assert cpu.build_key(cpu.sources()) != path.parent.name
    monkeypatch.setattr(cpu, "flags", flags)
    monkeypatch.setattr(cpu, "SOURCES", cpu.SOURCES[:-1])
    assert cpu.build_key(cpu.sources()) != path.parent.name


def test_unbuildable_kernel_falls_back_with_a_clear_warning(monkeypatch, tmp_path):
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu._load.cache_clear()
    fq._op.cache_clear()
    try:
        spec = QuantSpec(4, 64)
        w, alpha = mx.random.normal((8, 128), key=mx.random.key(8)), mx.full((8, 2), 0.2)
        with pytest.raises(RuntimeError, match="failed to build|C\\+\\+ compiler"):
            cpu.load()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fake_quant(w, alpha, spec, backend="cpu")
        assert any("MLX-ops path instead" in str(c.message) and "MLX_QAT_FAKE_QUANT=mlx" in str(c.message)
                   for c in caught)
        assert mx.array_equal(out, fake_quant(w, alpha, spec, backend="mlx")).item()
    finally:
        cpu._load.cache_clear()
        fq._op.cache_clear()
