// Metal preamble for the shared fake-quant bodies (the thread index line is in mlx_qat/gpu.py:
// MLX adds thread_position_in_grid to the signature only when the kernel source names it).
#pragma clang fp contract(off)
#define FN inline
#define RINT(x) metal::rint(x)
#define ABS(x) metal::abs(x)
#define CLAMP(x, lo, hi) metal::min(metal::max((x), (lo)), (hi))
#define MUL(a, b) ((a) * (b))
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define DIV(a, b) metal::precise::divide((a), (b))
#define AS_UINT(x) as_type<uint>(x)
#define LDEXP(x, e) metal::ldexp((x), (e))
#define AS_FLOAT(u) as_type<float>(u)
