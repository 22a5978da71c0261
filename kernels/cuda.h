// CUDA preamble for the shared fake-quant bodies. The _rn intrinsics are never contracted into
// FMAs and divide with IEEE rounding, so float32 results equal the MLX reference bit for bit.
typedef unsigned int uint;
#define FN __device__ inline
#define RINT(x) rintf(x)
#define ABS(x) fabsf(x)
#define CLAMP(x, lo, hi) fminf(fmaxf((x), (lo)), (hi))
#define MUL(a, b) __fmul_rn((a), (b))
#define ADD(a, b) __fadd_rn((a), (b))
#define SUB(a, b) __fsub_rn((a), (b))
#define DIV(a, b) __fdiv_rn((a), (b))
#define AS_UINT(x) __float_as_uint(x)
#define LDEXP(x, e) ldexpf((x), (e))
#define AS_FLOAT(u) __uint_as_float(u)
