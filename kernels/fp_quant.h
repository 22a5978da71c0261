// Per-group and per-element math of MLX's microscaling float formats, shared by every backend
// and included after a preamble (see fake_quant.h) that also defines AS_UINT and AS_FLOAT (a
// float's bits and back) and LDEXP (x · 2^e, exact). float32 results equal the MLX-ops reference
// of mlx_qat/fp_formats.py, and so MLX's own quantize -> dequantize, bit for bit. fmt is the
// mode's number in fp_formats.KERNEL_IDS: 0 mxfp4 (E2M1 elements, E8M0 scale), 1 nvfp4 (E2M1,
// E4M3 scale), 2 mxfp8 (E4M3, E8M0 scale). With x = w / divisor: forward ŵ = round(x) · dequant;
// backward dw = g where |x| <= the largest element.

FN float fp_element_max(int fmt) {
  return fmt == 2 ? 448.0f : 6.0f;
}

// Nearest E2M1 value as MLX's argmin over its table picks it: ties toward the smaller magnitude,
// |x| > 6 -> 6, zero (and NaN, and an infinity: no distance is smaller) -> +0, sign kept. A sum
// of selects rather than a chain of branches, so that the CPU loop vectorizes; every sum is exact.
FN float fp_round_e2m1(float x) {
  float m = ABS(x);
  float low = ADD(ADD(m > 0.25f ? 0.5f : 0.0f, m > 0.75f ? 0.5f : 0.0f),
                  ADD(m > 1.25f ? 0.5f : 0.0f, m > 1.75f ? 0.5f : 0.0f));
  float high = ADD(ADD(m > 2.5f ? 1.0f : 0.0f, m > 3.5f ? 1.0f : 0.0f), m > 5.0f ? 2.0f : 0.0f);
  float v = m <= 3.4028235e38f ? ADD(low, high) : 0.0f;
  return x < 0.0f ? SUB(0.0f, v) : v;
}

// Nearest E4M3 (fn) value: round half to even on the step of x's binade (2^-9 below 2^-6),
// saturating at ±448, sign and -0 kept. The step 2^(k-3), k in [-6, 128], is a normal float
// built from its exponent bits.
FN float fp_round_e4m3(float x) {
  float a = ABS(x);
  int k = int((AS_UINT(a) >> 23) & 0xFFu) - 127;
  float step = AS_FLOAT(uint((k < -6 ? -6 : k) - 3 + 127) << 23);
  return CLAMP(MUL(RINT(DIV(x, step)), step), -448.0f, 448.0f);
}

FN float fp_round(float x, int fmt) {
  return fmt == 2 ? fp_round_e4m3(x) : fp_round_e2m1(x);
}

// ceil(log2 s) for s >= 0 (0 for s = 0): the E8M0 exponent MLX picks (round(log2 s), plus one
// where 2^that < s) read off the bits, exact; a subnormal s is scaled into range first.
FN int fp_e8m0_exponent(float s) {
  if (s == 0.0f) {
    return 0;
  }
  int shift = s < 1.17549435e-38f ? 64 : 0;
  uint bits = AS_UINT(shift ? MUL(s, 18446744073709551616.0f) : s);
  return int((bits >> 23) & 0xFFu) - 127 + ((bits & 0x7FFFFFu) != 0u ? 1 : 0) - shift;
}

// What the elements of a group with max |w| = amax are divided by before rounding.
FN float fp_divisor(float amax, int fmt) {
  float s = DIV(amax, fp_element_max(fmt));
  return fmt == 1 ? fp_round_e4m3(s) : LDEXP(1.0f, fp_e8m0_exponent(s));
}

// What the rounded elements are multiplied by: the stored scale (E8M0: its byte, e + 127, wraps).
FN float fp_dequant(float amax, int fmt) {
  float s = DIV(amax, fp_element_max(fmt));
  return fmt == 1 ? fp_round_e4m3(s) : LDEXP(1.0f, ((fp_e8m0_exponent(s) + 127) & 255) - 127);
}
