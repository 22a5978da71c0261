"""Quantizer forward levels (hand-computed), straight-through gradients, and the one
description per kind that every backend reads."""

import dataclasses
import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_qat import QuantSpec, fake_quant, gpu, init_scale
from mlx_qat import fakequant as fq
from mlx_qat.constants import BITS
from mlx_qat.quantizers import QUANTIZERS, Quantizer, specs_from_dict, specs_to_dict

GRANULARITIES = [32, 64, 128, None]
ALL_BITS = [1, 1.58, 2, 3, 4, 5, 6, 8]

# x = w / α -> level q(x) in units of α, worked out by hand: binary sign(x) with sign(0) = +1;
# ternary round(clip(x, ±0.99)·1.5) / 1.5; 2-bit (round(clip(x, ±0.99)·2 − 0.5) + 0.5) / 2;
# B ≥ 3 clip(round(x), −2^(B−1), 2^(B−1) − 1).
# Round-half-to-even matters at the ties (2-bit at x = k/2, LSQ at x = k + 0.5).
HAND_CASES = {
    1: [(-2.0, -1), (-0.5, -1), (0.0, 1), (0.3, 1), (1e-8, 1), (-1e-8, -1), (5.0, 1)],
    1.58: [(0.0, 0), (0.3, 0), (-0.3, 0), (0.34, 2 / 3), (-0.34, -2 / 3), (0.99, 2 / 3), (1.5, 2 / 3), (-5.0, -2 / 3)],
    2: [
        (0.0, 0.25),  # 0·2 − 0.5 = −0.5 -> −0 (tie to even)
        (0.5, 0.25),  # 0.5 -> 0 (tie)
        (-0.5, -0.75),  # −1.5 -> −2 (tie)
        (0.24, 0.25), (-0.01, -0.25), (0.74, 0.75), (0.99, 0.75), (1.0, 0.75), (-1.0, -0.75), (7.0, 0.75),
    ],
    3: [(0.5, 0), (1.5, 2), (2.5, 2), (-0.5, 0), (-1.5, -2), (-2.5, -2), (3.0, 3), (3.5, 3), (-4.0, -4), (-4.5, -4), (10.0, 3), (-10.0, -4), (0.0, 0)],
    4: [(6.5, 6), (7.0, 7), (7.5, 7), (-7.5, -8), (-8.0, -8), (-9.0, -8), (0.49, 0), (0.51, 1)],
    5: [(14.5, 14), (15.0, 15), (16.0, 15), (-16.0, -16), (-17.0, -16), (-0.5, 0)],
    6: [(30.5, 30), (31.0, 31), (32.0, 31), (-32.0, -32), (-32.5, -32), (1.5, 2)],
    8: [(126.5, 126), (127.0, 127), (128.0, 127), (-128.0, -128), (-129.0, -128), (2.5, 2)],
}


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
def test_forward_levels_by_hand(bits, group_size):
    xs, levels = map(np.array, zip(*HAND_CASES[bits]))
    in_features = 256
    groups = 1 if group_size is None else in_features // group_size
    # Each group (and each row) gets its own power-of-two α, so w = x·α and ŵ = q·α are exact.
    alpha = 2.0 ** np.random.default_rng(0).integers(-3, 4, size=(4, groups))
    g = in_features // groups
    x = np.resize(xs, (4, in_features)).astype(np.float32)
    q = np.resize(levels, (4, in_features)).astype(np.float32)
    a_full = np.repeat(alpha, g, axis=1).astype(np.float32)
    w_hat = fake_quant(mx.array(x * a_full), mx.array(alpha.astype(np.float32)), QuantSpec(bits, group_size))
    np.testing.assert_array_equal(np.array(w_hat), q * a_full)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_levels_are_the_grid(bits):
    reach = 2 ** int(bits) + 1  # beyond both clip edges at α = 1
    w = mx.random.uniform(-reach, reach, (8, 512), key=mx.random.key(1))
    spec = QuantSpec(bits, 64)
    levels = np.unique(np.array(fake_quant(w, mx.ones((8, 8)), spec)))
    expected = {
        1: [-1, 1], 1.58: [-2 / 3, 0, 2 / 3], 2: [-0.75, -0.25, 0.25, 0.75],
    }.get(bits, np.arange(-(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1)))
    np.testing.assert_allclose(levels, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
def test_init_scale(bits, group_size):
    w = np.random.default_rng(0).normal(size=(6, 256)).astype(np.float32)
    alpha = np.array(init_scale(mx.array(w), QuantSpec(bits, group_size)))
    groups = np.abs(w).reshape(6, 1 if group_size is None else 256 // group_size, -1)
    qp = 2 ** (int(bits) - 1) - 1 if bits >= 3 else 1
    expected = groups.mean(-1) if bits == 1 else groups.max(-1) / qp
    np.testing.assert_allclose(alpha, expected, rtol=1e-6)


def ste_reference(w, alpha, g, bits, group_size):
    """The straight-through formulas, written out in numpy: w's gradient passes inside the clip
    range (|x| ≤ 1 binary, |x| ≤ 0.99 ternary/2-bit, Qn ≤ x ≤ Qp LSQ); α's gets g·s·∂q/∂α with
    ∂q/∂α = sign(x) (binary), q(x) − x inside and ±1 / ±0.75 beyond (ternary / 2-bit),
    round(x) − x inside and Qn / Qp beyond (LSQ), and s = 1/sqrt(numel · Qp)."""
    out, n = w.shape
    gs = n if group_size is None else group_size
    a = np.maximum(alpha, 1e-5)
    x = (w.reshape(out, -1, gs) / a[..., None]).astype(np.float64)
    gg = g.reshape(out, -1, gs).astype(np.float64)
    if bits == 1:
        qp = 1
        inside = np.abs(x) <= 1
        unit = np.where(w.reshape(x.shape) >= 0, 1.0, -1.0)
    elif bits in (1.58, 2):
        qp = 1
        inside = np.abs(x) <= 0.99
        c = np.clip(x, -0.99, 0.99)
        q = np.round(c * 1.5) / 1.5 if bits == 1.58 else (np.round(c * 2 - 0.5) + 0.5) / 2
        edge = 1.0 if bits == 1.58 else 0.75
        unit = np.where(inside, q - x, np.sign(x) * edge)
    else:
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        inside = (x >= qn) & (x <= qp)
        unit = np.where(x < qn, qn, np.where(x > qp, qp, np.round(x) - x))
    s = 1 / np.sqrt(w.size * qp)
    dw = (gg * inside).reshape(w.shape)
    dalpha = (gg * s * unit).sum(-1)
    return dw, dalpha


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group_size", GRANULARITIES)
def test_gradients_match_straight_through_formulas(bits, group_size):
    rng = np.random.default_rng(int(bits * 100) + (group_size or 0))
    spec = QuantSpec(bits, group_size)
    w = rng.normal(size=(16, 256)).astype(np.float32)
    # Shrink α so that a good share of the weights falls outside the clip range.
    alpha = np.array(init_scale(mx.array(w), spec)) * rng.uniform(0.3, 1.2, size=(16, 256 // (group_size or 256)))
    alpha = alpha.astype(np.float32)
    alpha[0, 0] = 0.0  # exercises the α >= 1e-5 clamp
    g = rng.normal(size=w.shape).astype(np.float32)
    _, (dw, dalpha) = mx.vjp(lambda w, a: fake_quant(w, a, spec), [mx.array(w), mx.array(alpha)], [mx.array(g)])
    ref_dw, ref_dalpha = ste_reference(w, alpha, g, bits, group_size)
    np.testing.assert_array_equal(np.array(dw), ref_dw.astype(np.float32))
    np.testing.assert_allclose(np.array(dalpha), ref_dalpha, rtol=2e-4, atol=1e-6)


def test_gradients_flow_through_a_loss():
    spec = QuantSpec(4, 32)
    w = mx.random.normal((8, 64), key=mx.random.key(3))
    alpha = init_scale(w, spec)
    dw, dalpha = mx.grad(lambda w, a: (fake_quant(w, a, spec) ** 2).sum(), argnums=(0, 1))(w, alpha)
    assert dw.shape == w.shape and dalpha.shape == alpha.shape
    assert mx.abs(dalpha).sum().item() > 0


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_weights(dtype):
    spec = QuantSpec(3, 64)
    w = mx.random.normal((4, 128), key=mx.random.key(5))
    alpha = init_scale(w, spec)
    w_hat = fake_quant(w.astype(dtype), alpha, spec)
    assert w_hat.dtype == dtype
    np.testing.assert_allclose(np.array(w_hat.astype(mx.float32)), np.array(fake_quant(w.astype(dtype).astype(mx.float32), alpha, spec)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bits", [0, 7, 9, 1.5, 16, True, "4"])
def test_invalid_bits(bits):
    with pytest.raises(ValueError, match="bits=.* not supported; use one of 1, 1.58, 2"):
        QuantSpec(bits=bits)


@pytest.mark.parametrize("group_size", [48, 16, 0, 256])
def test_invalid_group_size(group_size):
    with pytest.raises(ValueError, match="group_size=.* not supported; use one of 32, 64, 128, or None"):
        QuantSpec(bits=4, group_size=group_size)


def test_group_size_must_divide_the_row():
    spec = QuantSpec(bits=4, group_size=128)
    w = mx.zeros((4, 192))
    with pytest.raises(ValueError, match="does not divide the 192 inputs"):
        init_scale(w, spec)
    with pytest.raises(ValueError, match="does not divide the 192 inputs"):
        fake_quant(w, mx.ones((4, 1)), spec)


def test_scale_shape_is_checked():
    with pytest.raises(ValueError, match=r"α \[out, 2\]"):
        fake_quant(mx.zeros((4, 128)), mx.ones((4, 1)), QuantSpec(2, 64))


def test_one_description_per_kind():
    assert [q.name for q in QUANTIZERS] == ["binary", "ternary", "seq", "lsq"]
    assert sorted(q.kernel_id for q in QUANTIZERS) == [0, 1, 2, 3]  # the KIND cases of fake_quant.h
    assert BITS == tuple(ALL_BITS) == tuple(b for q in QUANTIZERS for b in q.bits)  # the kinds serve BITS, in order
    for bits in ALL_BITS:
        spec = QuantSpec(bits)
        assert [q for q in QUANTIZERS if bits in q.bits] == [spec.quantizer]
        assert spec.kind == spec.quantizer.name and (spec.qn, spec.qp) == spec.quantizer.levels(bits)
        assert spec.storage_bits == {1.58: 2}.get(bits, bits)
    assert not hasattr(gpu, "KINDS")  # no second table of kernel ids


def test_kernels_take_the_kind_from_the_description(monkeypatch):
    """The GPU template and the CPU kernel's arguments carry `spec.quantizer.kernel_id`."""
    w = mx.zeros((4, 64))
    for bits in ALL_BITS:
        spec = QuantSpec(bits, 32)
        template = dict(gpu.template(spec, w))
        assert (template["KIND"], template["QN"], template["QP"]) == (spec.quantizer.kernel_id, spec.qn, spec.qp)

    calls = []

    class Recorder:
        def forward(self, w, alpha, kind, qn, qp):
            calls.append((kind, qn, qp))
            return w

    monkeypatch.setattr("mlx_qat.cpu.load", Recorder)
    for bits in ALL_BITS:
        spec = QuantSpec(bits, 32)
        fq._cpu_backend(spec)[0](w, mx.ones((4, 2)))
        assert calls[-1] == (spec.quantizer.kernel_id, spec.qn, spec.qp)


def test_a_new_description_drives_the_reference():
    """The reference reads only the description: a kind with other constants quantizes on its own grid."""
    quarters = dataclasses.replace(QuantSpec(2).quantizer, name="quarters", steps=4.0, offset=0.5, zero=4.0)
    x = mx.array([-1.0, -0.3, 0.0, 0.2, 0.6, 2.0])
    level = quarters.level(x, -1, 1)
    scale, bias = quarters.affine_grid(mx.array(1.0), -1)
    np.testing.assert_allclose(np.array(level), [-0.875, -0.375, 0.125, 0.125, 0.625, 0.875])
    np.testing.assert_allclose(np.array(quarters.codes(x, -1, 1) * scale + bias), np.array(level))
    assert isinstance(quarters, Quantizer)


def test_spec_dicts_round_trip_through_json():
    specs = {"model.embed_tokens": QuantSpec(4, 64), "model.layers.0.mlp.up_proj": QuantSpec(1.58, None),
             "lm_head": QuantSpec(8, 128)}
    assert specs_from_dict(json.loads(json.dumps(specs_to_dict(specs)))) == specs
    assert QuantSpec.from_dict({"bits": 2, "group_size": 32}) == QuantSpec(2, 32)
    with pytest.raises(ValueError, match="bits=7 is not supported"):
        QuantSpec.from_dict({"bits": 7, "group_size": 64})
    with pytest.raises(ValueError, match="a QuantSpec is"):
        QuantSpec.from_dict({"bits": 2, "groupsize": 64})
