"""Fake quantization for MLX's microscaling floating-point formats: mxfp4, nvfp4 and mxfp8.

`fake_quant_fp(w, mode)` returns, bit for bit, what

    mx.dequantize(*mx.quantize(w, group_size=G, bits=B, mode=mode),
                  group_size=G, bits=B, mode=mode, dtype=mx.float32)

returns for a float32 `w` on MLX 0.32.4's CPU backend (the composite `fp_quantize` /
`fp_dequantize` fallbacks in mlx/ops.cpp, which is what runs on the CPU), but with one per-group
max and otherwise elementwise ops, so the same body can later become a fused kernel.
`fake_quant_fp_ste` wraps it in an `mx.custom_function` with a straight-through gradient.
GPU backends run their own kernels (CUDA: cutlass E2M1/E4M3 converters, round-half-even, and a
multiply by 1/scale), which need not agree at ties; they are not what this module matches.

The rules below were read from MLX's source (ops.cpp `fp_quantize`, with the "round MX block
scales up" change, commit e73e87d, PR #4353; cpu/unary_ops.h `ToFP8`) and then checked against the
installed 0.32.4 by probing planted values; where the two disagreed the installed build wins
(E4M3 saturation, noted below). Every rule is asserted in tests/test_fp_formats.py.

Groups: G consecutive elements along the last axis share one 8-bit scale; no bias.

    mode    G   element          scale   maxval (largest element)
    mxfp4   32  E2M1  (4 bits)   E8M0    6
    nvfp4   16  E2M1  (4 bits)   E4M3    6
    mxfp8   32  E4M3  (8 bits)   E8M0    448

E8M0 scale (mxfp4, mxfp8). All arithmetic is float32:
    s  = amax / maxval                       amax = max |w| over the group
    e0 = round(log2 s)                       (round half to even)
    e  = e0 + 1   if 2^e0 < s   else e0      so e = ceil(log2 s): the smallest 2^e >= s
    e  = 0        if s == 0                  (an all-zero group stores scale 2^0)
    x  = w / 2^e                             so |x| <= maxval: the scale always covers amax
    byte = uint8(e + 127)                    NOT clamped: wraps mod 256 (see below)
    w_hat = q(x) * 2^(byte - 127)
  Examples (mxfp4): amax 5 -> s = 0.83 -> 2^0, and 5 is an E2M1 tie -> 4; amax 7 -> s = 1.17 ->
  2^1, 7 / 2 = 3.5 is a tie -> 3, so 7 -> 6; amax 0.3 -> s = 0.05 -> 2^-4 (byte 123), 0.3 / 2^-4
  = 4.8 -> 4, so 0.3 -> 0.25. amax exactly 6 * 2^k gives 2^k and the next float above it gives
  2^(k+1): an exact ceil. (ceil(log2 s) in float32 misses that for k >= 4 or k <= -5, where
  log2 of the next float above 2^k rounds to k; the round-then-compare form does not.)
  The byte is not clamped to the E8M0 range: when e + 127 falls outside [0, 254] (amax below about
  maxval * 2^-127, e.g. a group of ~1e-38 values, or above ~2^128) it wraps and the dequantized
  group is garbage (inf, or 2^121 times too large). That is MLX's behaviour and is reproduced.

E4M3 rounding (nvfp4 scales, mxfp8 elements), the installed `mx.to_fp8` followed by `from_fp8`:
    a = |x|;  k = max(floor(log2 a), -6)     (-6: E4M3's smallest normal exponent)
    q = round_half_even(x / 2^(k-3)) * 2^(k-3)   3 mantissa bits; subnormal step 2^-9
    q = clip(q, -448, 448)                   saturates, never NaN; inf -> 448
  Sign is kept, so -0.0 and negative values that round to zero give -0.0. (MLX's source maps
  (464, 480) to the NaN code 0x7F; the installed 0.32.4 saturates them to 448, as here.)

E2M1 rounding (mxfp4, nvfp4 elements): MLX takes `argmin_i |x - LUT[i]|` over the 16-entry table
    LUT = [+0, .5, 1, 1.5, 2, 3, 4, 6, -0, -.5, -1, -1.5, -2, -3, -4, -6]
  and argmin returns the first minimal index. That means:
    round to nearest, ties toward the SMALLER magnitude (not ties-to-even): 0.25 -> 0,
      0.75 -> 0.5, 1.25 -> 1, 1.75 -> 1.5, 2.5 -> 2, 3.5 -> 3, 5 -> 4;
    |x| > 6 -> 6 (saturate);
    zero is always +0: -0.0 and small negatives give +0.0 (the +0 entry comes first);
    equivalently q = sign(x) * R(|x|), R the first-minimum over [0, .5, 1, 1.5, 2, 3, 4, 6] of
      float32 |(|x| - v)|; that is the exact form used below (it also reproduces the collapse for
      |x| >~ 2^25, where the float32 distances tie and argmin falls back to 4 or 0).

NVFP4 scale (E4M3, no per-group exponent):
    s = e4m3(amax / 6 * enc)                 enc = 1, or 448*6 / global_scale if one is given
    x = (w / s) * enc
    w_hat = e2m1(x) * (s * global_scale / (448*6))    (times 1 without a global scale)
  A per-tensor `global_scale` is optional: `mx.quantize` uses none unless passed one (then
  `mx.dequantize` must get the same one). Unlike E8M0, the E4M3 scale is rounded to nearest, so
  it can land up to 1/16 below amax/6: then |x| reaches up to 6.4 and those elements are clipped
  to 6. amax / 6 above 464 saturates the scale at 448 and clips much more. amax / 6 below 2^-10
  rounds the scale to 0: the group becomes w / 0 (inf or NaN), which E2M1 maps to +0.

Straight-through gradient (`fake_quant_fp_ste`): dL/dw = dL/dw_hat where |x| <= maxval (x the
scaled value fed to the element rounding), 0 where it was clipped. The scale comes from amax and
gets no gradient. For mxfp4 and mxfp8 the E8M0 scale is rounded up, so nothing is clipped
(|x| <= maxval for every group whose amax / maxval is a normal float32): there dL/dw = g
everywhere. For nvfp4 the elements clipped by a rounded-down scale (usually a group's maximum)
get 0.

Inputs: float32 with the last axis divisible by G; NaN/inf inputs are not supported.
"""

from functools import cache

import mlx.core as mx

from . import constants

SCALE_FORMATS = {"mxfp4": "e8m0", "nvfp4": "e4m3", "mxfp8": "e8m0"}
# mode -> (group_size, bits, scale format); the (group_size, bits) pairs are constants.FP_MODES
FORMATS = {mode: (*grid, SCALE_FORMATS[mode]) for mode, grid in constants.FP_MODES.items()}
KERNEL_IDS = {"mxfp4": 0, "nvfp4": 1, "mxfp8": 2}  # each mode's number in the kernels (kernels/fp_quant.h)

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_GLOBAL_ENCODE = E4M3_MAX * E2M1_MAX  # 2688: MLX's nvfp4 global scale maps amax to 448*6
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def bits_per_weight(mode: str) -> float:
    """Stored bits per weight: element bits + one 8-bit scale per group, bits + 8 / group_size.

    mxfp4 4.25, nvfp4 4.5, mxfp8 8.25. (An nvfp4 global scale adds one float32 per tensor.)"""
    group_size, bits, _ = FORMATS[mode]
    return bits + 8 / group_size


def element_max(mode: str) -> float:
    """Largest element magnitude: 6 for E2M1, 448 for E4M3."""
    return E2M1_MAX if FORMATS[mode][1] == 4 else E4M3_MAX


def round_e2m1(x: mx.array) -> mx.array:
    """Nearest E2M1 value the way MLX's argmin over its LUT picks it: ties toward the smaller
    magnitude, |x| > 6 -> 6, zero always +0 (see the module docstring)."""
    m = mx.abs(x)
    best_v = mx.zeros_like(m)
    best_d = m  # distance to 0, the first LUT entry
    for v in E2M1_VALUES[1:]:
        d = mx.abs(m - v)
        closer = d < best_d  # strict: an equal distance keeps the earlier (smaller) value
        best_d = mx.where(closer, d, best_d)
        best_v = mx.where(closer, v, best_v)
    # 0 - 0 is +0, so negative inputs that round to zero stay +0 as in MLX.
    return mx.where(x < 0, 0.0 - best_v, best_v)


def round_e4m3(x: mx.array) -> mx.array:
    """Nearest E4M3 (fn) value, round half to even, saturating at +-448, sign (and -0) kept:
    what MLX 0.32.4's `from_fp8(to_fp8(x))` returns for finite float32 x."""
    a = mx.abs(x)
    # floor(log2 a) from the float32 exponent field; below 2^-6 the step stays 2^-9 (subnormals).
    k = (mx.view(a, mx.uint32) >> 23).astype(mx.int32) - 127
    k = mx.maximum(k, -6)
    step = mx.power(2.0, (k - 3).astype(mx.float32))  # exact: an integer power of two
    q = mx.round(x / step) * step  # both products exact; mx.round is half-to-even, keeps -0
    return mx.clip(q, -E4M3_MAX, E4M3_MAX)


def e8m0_exponent(s: mx.array) -> mx.array:
    """The E8M0 exponent e (float32, integer-valued) MLX picks for s = amax / maxval:
    e = round(log2 s), plus 1 if 2^e < s (so 2^e >= s), and 0 where s == 0."""
    e = mx.round(mx.log2(s))
    e = mx.where(mx.power(2.0, e) < s, e + 1, e)
    return mx.where(s == 0, 0.0, e)


def _scaled(w: mx.array, mode: str, global_scale=None):
    """Group w and return (x, scale): x the scaled values the element rounding sees, scale the
    per-group factor dequantization multiplies by, both shaped [..., K // G, G | 1]."""
    if mode not in FORMATS:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(FORMATS)}")
    group_size, _, scale_format = FORMATS[mode]
    if w.shape[-1] % group_size:
        raise ValueError(f"{mode}: last dimension {w.shape[-1]} is not a multiple of {group_size}")
    wg = w.reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    amax = mx.max(mx.abs(wg), axis=-1, keepdims=True)
    s = amax / element_max(mode)
    if scale_format == "e8m0":
        if global_scale is not None:
            raise ValueError(f"{mode} takes no global scale (only nvfp4 does)")
        e = e8m0_exponent(s)
        x = wg / mx.power(2.0, e)
        # Dequantization reads the stored byte; uint8(e + 127) wraps outside [0, 255] as in MLX.
        stored = (e + 127).astype(mx.uint8).astype(mx.float32)
        return x, mx.power(2.0, stored - 127)
    if global_scale is None:
        scale = round_e4m3(s)
        return wg / scale, scale
    # MLX's order of operations, kept so the float32 roundings match.
    encode = NVFP4_GLOBAL_ENCODE / global_scale
    scale = round_e4m3(s * encode)
    return (wg / scale) * encode, scale * (global_scale / NVFP4_GLOBAL_ENCODE)


def fake_quant_fp(w: mx.array, mode: str, global_scale=None) -> mx.array:
    """Quantize-dequantize float32 `w` in `mode` ("mxfp4", "nvfp4", "mxfp8"), bit-identical to
    MLX's quantize -> dequantize(dtype=float32). `global_scale` (a float32 scalar array) is the
    optional per-tensor nvfp4 scale. Formulas in the module docstring."""
    x, scale = _scaled(w, mode, global_scale)
    q = round_e2m1(x) if FORMATS[mode][1] == 4 else round_e4m3(x)
    return (q * scale).reshape(w.shape)


def ste_mask(w: mx.array, mode: str, global_scale=None) -> mx.array:
    """True where the straight-through gradient passes: |x| <= maxval for the scaled value x;
    False where the element was clipped to +-maxval. All True for mxfp4/mxfp8 in normal range."""
    x, _ = _scaled(w, mode, global_scale)
    return (mx.abs(x) <= element_max(mode)).reshape(w.shape)


@cache
def _ste(mode: str, with_global_scale: bool):
    # One custom_function per mode: its arguments must be arrays, so the mode is closed over.
    if with_global_scale:

        @mx.custom_function
        def f(w, global_scale):
            return fake_quant_fp(w, mode, global_scale)

        @f.vjp
        def f_vjp(primals, cotangent, output):
            w, global_scale = primals
            grad = mx.where(ste_mask(w, mode, global_scale), cotangent, 0.0)
            return grad, mx.zeros_like(global_scale)  # the global scale is not learned

    else:

        @mx.custom_function
        def f(w):
            return fake_quant_fp(w, mode)

        @f.vjp
        def f_vjp(w, cotangent, output):  # with one argument MLX passes it (and wants) bare
            return mx.where(ste_mask(w, mode), cotangent, 0.0)

    return f


def fake_quant_fp_ste(w: mx.array, mode: str, global_scale=None) -> mx.array:
    """`fake_quant_fp` with a straight-through gradient: dL/dw = g * ste_mask(w). The scale is
    derived from amax and treated as a constant."""
    if global_scale is None:
        return _ste(mode, False)(w)
    return _ste(mode, True)(w, global_scale)


# ---------------------------------------------------------------- learned scales
#
# A learned scale α per group (QuantSpec(..., learned_scale=True)) in place of the one derived from
# amax: the format stores only some scales, so α is rounded to the nearest of them in every
# forward (straight through in the backward, as LSQ's α):
#     E8M0 (mxfp4, mxfp8): s = 2^round(log2 α);   E4M3 (nvfp4): s = e4m3(max(α, 2^-9))
#     x = w / s,   ŵ = q(x) · s                    q: E2M1 or E4M3 rounding, saturating as above
#     dL/dw = g where |x| <= maxval,  dL/dα = gs · Σ_group g · (q(x) − x·[|x| <= maxval])
# with LSQ's gradient scale gs = 1 / sqrt(numel(W) · levels), levels the format's positive element
# values (7 for E2M1, 126 for E4M3). α starts at the derived scale (`derived_scale`), so a model
# starts where derived-scale QAT starts, bit for bit; but for nvfp4 a scale is at least 2^-9 (the
# smallest E4M3 number), where MLX's derived scale of a group with amax < 6·2^-10 rounds to 0 and
# zeroes the group: a learned scale of 0 would get no gradient and never move. The export packs q
# and s itself (`pack_learned`): mx.quantize would derive its own scales.

E4M3_MIN = 2.0 ** -9  # the smallest positive E4M3 number
LEVELS = {4: 7, 8: 126}  # positive element values of E2M1 and E4M3 (fn)


def derived_scale(w: mx.array, mode: str) -> mx.array:
    """[out, in / G] the scale MLX derives per group (a learned α's starting value): 2^ceil(log2 s)
    for E8M0, e4m3(s) for nvfp4 (at least 2^-9: it may round to 0), s = amax / maxval."""
    amax = mx.max(mx.abs(w.astype(mx.float32).reshape(w.shape[0], -1, FORMATS[mode][0])), axis=-1)
    s = amax / element_max(mode)
    if FORMATS[mode][2] == "e4m3":
        return mx.maximum(round_e4m3(s), E4M3_MIN)
    return mx.power(2.0, e8m0_exponent(s))


def stored_scale(alpha: mx.array, mode: str) -> mx.array:
    """The scale the format stores nearest a learned α (see above)."""
    if FORMATS[mode][2] == "e4m3":
        return round_e4m3(mx.maximum(alpha, E4M3_MIN))
    return mx.power(2.0, mx.round(mx.log2(mx.maximum(alpha, 2.0 ** -126))))


def _learned_parts(w: mx.array, alpha: mx.array, mode: str):
    """(x, q, s) of a learned-scale group: x = w / s [out, in / G, G], q its rounding, s [.., 1]."""
    group = FORMATS[mode][0]
    s = stored_scale(alpha.astype(mx.float32), mode)[..., None]
    x = w.astype(mx.float32).reshape(w.shape[0], -1, group) / s
    q = round_e2m1(x) if FORMATS[mode][1] == 4 else round_e4m3(x)
    return x, q, s


@cache
def _learned(mode: str):
    @mx.custom_function
    def f(w, alpha):
        _, q, s = _learned_parts(w, alpha, mode)
        return (q * s).reshape(w.shape).astype(w.dtype)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        w, alpha = primals
        x, q, _ = _learned_parts(w, alpha, mode)
        passes = mx.abs(x) <= element_max(mode)
        g = cotangent.astype(mx.float32).reshape(x.shape)
        scale = (w.size * LEVELS[FORMATS[mode][1]]) ** -0.5
        dalpha = (g * (q - mx.where(passes, x, 0.0))).sum(axis=-1) * scale
        return mx.where(passes, g, 0.0).reshape(w.shape).astype(w.dtype), dalpha.astype(alpha.dtype)

    return f


def fake_quant_fp_learned(w: mx.array, alpha: mx.array, mode: str) -> mx.array:
    """ŵ of W [out, in] in `mode` on the learned scales α [out, in / G] (see above), differentiable
    in both."""
    return _learned(mode)(w, alpha)


def pack_learned(w: mx.array, alpha: mx.array, mode: str):
    """(packed weight uint32, scales uint8) in MLX's layout for `mode`: `mx.dequantize` of them
    (mode=mode) is fake_quant_fp_learned(w, α) bit for bit. Elements are E2M1 codes (sign bit 3,
    the index into E2M1_VALUES below it), eight to a little-endian uint32, or E4M3 bytes, four to
    one; scales are E8M0 bytes (the exponent + 127) or E4M3 bytes."""
    _, q, s = _learned_parts(w, alpha, mode)
    q = q.reshape(w.shape)
    if FORMATS[mode][1] == 4:
        magnitude = sum((mx.abs(q) > (a + b) / 2).astype(mx.uint32) for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:]))
        codes = magnitude | ((q < 0).astype(mx.uint32) << 3)
        nibbles = codes.reshape(w.shape[0], -1, 8) << (4 * mx.arange(8, dtype=mx.uint32))
        packed = nibbles.sum(axis=-1).astype(mx.uint32)
    else:
        packed = mx.view(mx.to_fp8(q), mx.uint32)
    s = s[..., 0]
    scales = mx.to_fp8(s) if FORMATS[mode][2] == "e4m3" else ((mx.view(s, mx.uint32) >> 23) & 0xFF).astype(mx.uint8)
    return packed, scales
