// Per-element fake-quant math, shared by every backend. Included after a preamble that defines
// FN (function qualifiers), ABS, RINT, CLAMP and the correctly rounded MUL/ADD/SUB/DIV (no FMA
// contraction, no fast division), so float32 results equal the MLX reference (the Quantizer
// descriptions of mlx_qat/quantizers.py) bit for bit: same constants, same operation order.
// With x = w / a: forward ŵ = code(x)·scale + bias; backward dw = g·pass(x), dα_elem = g·unit(x).
// kind is Quantizer.kernel_id: 0 binary, 1 ternary, 2 SEQ 2-bit, 3 LSQ with clip levels qn, qp.

// A group's scale as the reference uses it (clamped away from zero).
FN float group_scale(float alpha) {
  return alpha > 1e-5f ? alpha : 1e-5f;
}

// ŵ = code(w / a) · scale + bias: the affine grid MLX's quantization stores.
FN float fake_quant_value(float w, float a, int kind, int qn, int qp) {
  float x = DIV(w, a);
  float code, scale, bias;
  if (kind == 0) {
    code = x >= 0.0f ? 1.0f : 0.0f;
    scale = MUL(2.0f, a);
    bias = -a;
  } else if (kind == 1) {
    code = ADD(RINT(MUL(CLAMP(x, -0.99f, 0.99f), 1.5f)), 1.0f);
    scale = DIV(MUL(a, 2.0f), 3.0f);
    bias = -scale;
  } else if (kind == 2) {
    code = ADD(RINT(SUB(MUL(CLAMP(x, -0.99f, 0.99f), 2.0f), 0.5f)), 2.0f);
    scale = DIV(a, 2.0f);
    bias = MUL(a, -0.75f);
  } else {
    code = SUB(CLAMP(RINT(x), float(qn), float(qp)), float(qn));
    scale = a;
    bias = MUL(a, float(qn));
  }
  return ADD(MUL(code, scale), bias);
}

// Straight-through: does the gradient reach w at x = w / a?
FN bool fake_quant_passes(float x, int kind, int qn, int qp) {
  if (kind == 0) {
    return ABS(x) <= 1.0f;
  } else if (kind == 1 || kind == 2) {
    return ABS(x) <= 0.99f;
  }
  return !((x < float(qn)) | (x > float(qp)));  // | not ||: no branch, so it vectorizes
}

// ∂ŵ/∂α at x = w / a (before the group's gradient scale).
FN float fake_quant_unit(float x, int kind, int qn, int qp) {
  if (kind == 0) {
    return x >= 0.0f ? 1.0f : -1.0f;
  } else if (kind == 1 || kind == 2) {
    float c = CLAMP(x, -0.99f, 0.99f);
    float level = kind == 1 ? DIV(RINT(MUL(c, 1.5f)), 1.5f)
                            : DIV(ADD(RINT(SUB(MUL(c, 2.0f), 0.5f)), 0.5f), 2.0f);
    float edge = kind == 1 ? 1.0f : 0.75f;
    float inside = SUB(level, x);
    return ABS(x) <= 0.99f ? inside : (x > 0.0f ? edge : -edge);
  }
  // Every candidate computed before choosing: selects, not branches, so the CPU loop vectorizes.
  float inside = SUB(RINT(x), x);
  return x < float(qn) ? float(qn) : (x > float(qp) ? float(qp) : inside);
}
