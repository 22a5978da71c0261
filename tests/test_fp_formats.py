"""fp_formats: bit-exact agreement with MLX's own quantize -> dequantize for mxfp4, nvfp4 and
mxfp8 (random weights and planted edge cases), the E4M3 / E2M1 / E8M0 rules on their own,
straight-through gradients against a numpy reference, and bits per weight from the packed arrays."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_qat.fp_formats import (
    FORMATS,
    bits_per_weight,
    e8m0_exponent,
    element_max,
    fake_quant_fp,
    fake_quant_fp_ste,
    round_e2m1,
    round_e4m3,
    ste_mask,
)

MODES = list(FORMATS)
F32 = np.float32


def mlx_roundtrip(w, mode, global_scale=None):
    g, b, _ = FORMATS[mode]
    kw = {} if global_scale is None else {"global_scale": global_scale}
    packed = mx.quantize(w, group_size=g, bits=b, mode=mode, **kw)
    return mx.dequantize(*packed, group_size=g, bits=b, mode=mode, dtype=mx.float32, **kw)


def assert_bits_equal(a, b):
    """Equal float32 bit patterns: +0 vs -0 and NaN payloads count as different."""
    a_bits, b_bits = np.array(a).view(np.uint32), np.array(b).view(np.uint32)
    bad = np.flatnonzero(a_bits != b_bits)
    first = bad[:5]
    assert bad.size == 0, f"{bad.size} differ, at {first}: {np.array(a).flat[first]} vs {np.array(b).flat[first]}"


def assert_matches_mlx(w, mode, global_scale=None):
    w = mx.array(np.asarray(w, dtype=F32)) if not isinstance(w, mx.array) else w
    ours, theirs = fake_quant_fp(w, mode, global_scale), mlx_roundtrip(w, mode, global_scale)
    assert ours.dtype == mx.float32 and ours.shape == w.shape
    assert_bits_equal(ours, theirs)
    assert mx.array_equal(ours, theirs, equal_nan=True)


def groups_to_matrix(groups, group_size, filler=0.0):
    """One group per row, padded with `filler` to the group size; rows padded to an even count
    so that MLX's 4-bit packing (32 elements per uint32 block) accepts nvfp4 too."""
    rows = [list(g) + [filler] * (group_size - len(g)) for g in groups]
    if len(rows) % 2:
        rows.append([0.0] * group_size)
    return np.array(rows, dtype=F32).reshape(-1, 2 * group_size)


# --- random weights ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("std", [0.02, 1.0, 100.0, 1e-6, 1e6])
def test_random_normal_bit_exact(mode, std):
    w = mx.random.normal((64, 256), key=mx.random.key(7)) * std
    assert_matches_mlx(w, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 64), (2, 2, 2, 96), (128, 32)])
def test_shapes_bit_exact(mode, shape):
    rng = np.random.default_rng(sum(shape))
    # Heavy-tailed, mixed-magnitude rows: groups span many binades.
    w = rng.standard_t(2, size=shape) * np.exp(rng.uniform(-8, 8, size=shape[:-1] + (1,)))
    assert_matches_mlx(w.astype(F32), mode)


@pytest.mark.parametrize("gs", [1.0, 3.0, 0.01, 1e4])
def test_nvfp4_global_scale_bit_exact(gs):
    w = mx.random.normal((32, 128), key=mx.random.key(3))
    assert_matches_mlx(w, "nvfp4", mx.array(gs, dtype=mx.float32))


# --- planted values --------------------------------------------------------------------------

E2M1_TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]


def _near(v):
    return [np.nextafter(F32(v), F32(0)), F32(v), np.nextafter(F32(v), F32(np.inf))]


@pytest.mark.parametrize("mode", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("k", [0, -20, 5, 40])
def test_e2m1_ties_and_neighbours(mode, k):
    """With 6 * 2^k in the group the scale is exactly 2^k for both E8M0 and E4M3, so the other
    elements land on the E2M1 ties (and one float either side) after scaling."""
    g = FORMATS[mode][0]
    vals = [v for t in E2M1_TIES for v in _near(t)] + [0.1, 0.0, -0.0, 6.0]
    groups = []
    for sign in (1, -1):
        vs = [sign * v for v in vals]
        for i in range(0, len(vs), g - 1):
            groups.append([6.0] + vs[i : i + g - 1])
    w = groups_to_matrix(groups, g) * F32(2.0**k)
    assert_matches_mlx(w, mode)


@pytest.mark.parametrize("k", [0, -30, 10])
def test_e4m3_ties_subnormals_mxfp8(k):
    """mxfp8 with 448 * 2^k in the group (scale 2^k): E4M3 midpoints (ties to even), neighbours,
    the subnormal range (step 2^-9), values that round to zero, signed zeros."""
    codes = e4m3_table()
    mids = (codes[1:] + codes[:-1]) / 2
    vals = np.concatenate([codes, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf), [2.0**-11, 1e-30]])
    vals = np.concatenate([vals, -vals, [-0.0]]).astype(F32)
    groups = [[448.0] + list(vals[i : i + 31]) for i in range(0, len(vals), 31)]
    assert_matches_mlx(groups_to_matrix(groups, 32) * F32(2.0**k), "mxfp8")


@pytest.mark.parametrize("mode", MODES)
def test_scale_boundaries(mode):
    """amax at maxval * 2^k and one float either side (E8M0 rounds up exactly at the boundary;
    E4M3 rounds the scale to nearest), across a wide range of k."""
    g, fmt = FORMATS[mode][0], FORMATS[mode][2]
    m = element_max(mode)
    # a / 20 is what tells the scales apart: 0.3 -> 0.5 at scale 2^k, 0.15 -> 0 at 2^(k+1).
    groups = [[a, a / 3, -a / 2, a / 7, a / 20] for k in range(-100, 101, 9) for a in _near(m * 2.0**k)]
    w = mx.array(groups_to_matrix(groups, g))
    assert_matches_mlx(w, mode)
    # The stored scales themselves.
    _, scales = mx.quantize(w, group_size=g, bits=FORMATS[mode][1], mode=mode)
    amax = mx.max(mx.abs(w.reshape(w.shape[0], -1, g)), axis=-1)
    if fmt == "e8m0":
        assert mx.array_equal((e8m0_exponent(amax / m) + 127).astype(mx.uint8), scales)
    else:
        assert_bits_equal(round_e4m3(amax / m), mx.from_fp8(scales, dtype=mx.float32))


@pytest.mark.parametrize("mode", MODES)
def test_zeros_tiny_and_outliers(mode):
    g = FORMATS[mode][0]
    groups = [
        [],  # all zeros
        [-0.0, -0.0],  # negative zeros only
        [1e-3, 1e-40, -1e-42, 3e-39],  # float32 subnormal elements in a normal group
        [1e-38, -5e-39],  # amax / maxval below 2^-127: the E8M0 byte wraps (MLX bug, reproduced)
        [1e-40, 1e-45],
        [1e4, 0.01, -0.02, 0.003],  # one huge outlier: the rest flush to zero
        [-3e38, 1.0],  # near float32 max: dequantization overflows to inf in MLX too
        [1e-4, -1e-4, 5e-5],  # nvfp4: amax / 6 under 2^-10, the E4M3 scale is 0
    ]
    # nvfp4: amax / 6 rounding down to an E4M3 scale (1.0625 is a tie), the scale saturating at
    # 448 (amax 2688 = 6 * 448; 2784 = 6 * 464; 2800 lands in (464, 480)), and huge outliers
    # whose scaled value is so large that float32 distances to the E2M1 values tie.
    big = [6.0 * 1.0625, 6.0 * 1.03, 2688.0, 2784.0, 2800.0, 3000.0, 1e6, 1e12, 1e20, 1e30]
    groups += [[a, 1.0, -0.5] for a in big]
    assert_matches_mlx(groups_to_matrix(groups, g, filler=0.0), mode)
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, size=(16, 4 * g)).astype(F32)
    w[rng.integers(0, 16, 8), rng.integers(0, 4 * g, 8)] = rng.choice([-1, 1], 8) * F32(50.0)
    assert_matches_mlx(w, mode)


def test_documented_mxfp4_examples():
    cases = [(5.0, 127, 4.0), (7.0, 128, 6.0), (0.3, 123, 0.25), (6.0, 127, 6.0), (0.0, 127, 0.0)]
    for amax, byte, out in cases:
        w = groups_to_matrix([[amax]], 32)
        _, scales = mx.quantize(mx.array(w), mode="mxfp4")
        assert scales[0, 0].item() == byte
        assert fake_quant_fp(mx.array(w), "mxfp4")[0, 0].item() == out
        assert e8m0_exponent(mx.array(amax / 6.0)).item() == byte - 127


# --- the element and scale rules on their own -------------------------------------------------


def e4m3_table():
    """Non-negative finite E4M3 (fn) values from the definition, ascending (127 values)."""
    sub = [m * 2.0**-9 for m in range(8)]
    normal = [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return np.array(sub + normal, dtype=np.float64)


def np_round_e4m3(x):
    """Table reference: nearest value, ties to the even code, saturate at 448, sign kept."""
    table = e4m3_table()
    a = np.minimum(np.abs(x.astype(np.float64)), 448.0)
    hi = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo = hi - 1
    d_lo, d_hi = a - table[lo], table[hi] - a
    pick = np.where((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0)), hi, lo)
    return (np.copysign(table[pick], x)).astype(F32)


def np_round_e2m1(x):
    """Nearest of [0, .5, 1, 1.5, 2, 3, 4, 6], ties toward the smaller magnitude (first argmin),
    zero is +0. Distances in float32 like MLX's: for |x| >~ 2^25 they tie and the pick drifts
    down (1e9 -> 0)."""
    table = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=F32)
    d = np.abs(np.abs(x)[..., None] - table)
    v = table[np.argmin(d, axis=-1)]
    return np.where(x < 0, -v, v).astype(F32) + F32(0.0)  # + 0.0 turns -0 into +0


def test_round_e4m3_against_mlx_and_table():
    rng = np.random.default_rng(0)
    t = e4m3_table()
    mids = (t[1:] + t[:-1]) / 2
    x = np.concatenate([
        t, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf),
        [448, 455, 456, 464, 465, 470, 479.9, 480, 500, 1e6, 3e38, 2.0**-10, 2.0**-12, 1e-40, 0.0],
        np.exp2(rng.uniform(-14, 10, 20000)),
    ]).astype(F32)
    x = np.concatenate([x, -x])
    ours = round_e4m3(mx.array(x))
    assert_bits_equal(ours, mx.from_fp8(mx.to_fp8(mx.array(x)), dtype=mx.float32))
    assert_bits_equal(ours, np_round_e4m3(x))


def test_round_e2m1_table():
    ties = [t + s for t in E2M1_TIES for s in (-1e-6, 0, 1e-6)]
    huge = [2.0**24, 2.0**25 + 4, 2.0**26 + 8, 1e8, 1e9]
    x = np.concatenate([np.linspace(-8, 8, 4097), ties, [-0.0, -1e-30], huge])
    x = np.concatenate([x, -x]).astype(F32)
    assert_bits_equal(round_e2m1(mx.array(x)), np_round_e2m1(x))


def np_e8m0_exponent(s):
    """Exact ceil(log2 s) for positive normal float32 s, from frexp: s = m * 2^E, m in [0.5, 1)."""
    m, e = np.frexp(s.astype(np.float64))
    return np.where(s == 0, 0, np.where(m == 0.5, e - 1, e)).astype(F32)


def test_e8m0_exponent_is_exact_ceil():
    rng = np.random.default_rng(2)
    powers = np.exp2(np.arange(-120, 121, dtype=np.float64)).astype(F32)
    s = np.concatenate([
        powers, np.nextafter(powers, 0), np.nextafter(powers, np.inf), np.exp2(rng.uniform(-120, 120, 5000)), [0.0]
    ]).astype(F32)
    # Numeric equality: round(log2 s) may give -0.0 for s just under 1, the same exponent.
    assert np.array_equal(np.array(e8m0_exponent(mx.array(s))), np_e8m0_exponent(s))


# --- straight-through gradients -----------------------------------------------------------------


def np_ste_mask(w, mode):
    """Numpy reference: pass-through where |w / scale| <= maxval (float32 throughout)."""
    g, _, fmt = FORMATS[mode]
    m = element_max(mode)
    wg = w.reshape(*w.shape[:-1], -1, g)
    s = np.abs(wg).max(-1, keepdims=True) / F32(m)
    if fmt == "e8m0":
        x = wg / np.exp2(np_e8m0_exponent(s)).astype(F32)
    else:
        x = wg / np_round_e4m3(s)
    return (np.abs(x) <= m).reshape(w.shape)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("std", [0.02, 1.0, 300.0])
def test_ste_gradient_matches_numpy(mode, std):
    rng = np.random.default_rng(int(std * 100))
    w = (rng.normal(size=(32, 128)) * std).astype(F32)
    cot = rng.normal(size=w.shape).astype(F32)
    (out,), (grad,) = mx.vjp(lambda x: fake_quant_fp_ste(x, mode), [mx.array(w)], [mx.array(cot)])
    assert_bits_equal(out, fake_quant_fp(mx.array(w), mode))
    mask = np_ste_mask(w, mode)
    assert_bits_equal(grad, np.where(mask, cot, F32(0.0)))
    assert np.array_equal(np.array(ste_mask(mx.array(w), mode)), mask)
    if FORMATS[mode][2] == "e8m0":
        assert mask.all()  # the E8M0 scale is rounded up: nothing clips, the STE is the identity
    else:
        assert 0 < (~mask).sum() < mask.size / 16  # E4M3 scales round down sometimes: maxima clip


def test_ste_gradient_with_global_scale():
    w = mx.random.normal((16, 64), key=mx.random.key(5))
    gs = mx.array(2.5, dtype=mx.float32)
    grad_w, grad_gs = mx.grad(lambda a, b: fake_quant_fp_ste(a, "nvfp4", b).sum(), argnums=(0, 1))(w, gs)
    assert mx.array_equal(grad_w, ste_mask(w, "nvfp4", gs).astype(mx.float32))
    assert grad_gs.item() == 0.0


# --- storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,expected", [("mxfp4", 4.25), ("nvfp4", 4.5), ("mxfp8", 8.25)])
def test_bits_per_weight_from_packed_arrays(mode, expected):
    g, b, _ = FORMATS[mode]
    w = mx.zeros((8, 256))
    wq, scales = mx.quantize(w, group_size=g, bits=b, mode=mode)
    stored = wq.size * wq.dtype.size * 8 + scales.size * scales.dtype.size * 8
    assert stored / w.size == bits_per_weight(mode) == expected


def test_bad_arguments():
    with pytest.raises(ValueError):
        fake_quant_fp(mx.zeros((2, 48)), "mxfp4")
    with pytest.raises(ValueError):
        fake_quant_fp(mx.zeros((2, 32)), "fp4")
    with pytest.raises(ValueError):
        fake_quant_fp(mx.zeros((2, 32)), "mxfp4", mx.array(1.0))
