// Host (C++) preamble: runs the shared bodies on the CPU to test them without a GPU.
// Compile with -ffp-contract=off so that a*b+c stays two roundings, as on the GPU backends.
#include <cmath>
#include <cstdint>
typedef unsigned int uint;
#define FN static inline
#define RINT(x) std::rint(x)
#define ABS(x) std::fabs(x)
// Comparisons, not fmin/fmax: they vectorize, and a NaN stays NaN as in MLX's clip.
#define CLAMP(x, lo, hi) ((x) > (hi) ? (hi) : ((x) < (lo) ? (lo) : (x)))
#define MUL(a, b) ((a) * (b))
#define ADD(a, b) ((a) + (b))
#define SUB(a, b) ((a) - (b))
#define DIV(a, b) ((a) / (b))
#include <cstring>
static inline uint host_as_uint(float x) {
  uint u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}
#define AS_UINT(x) host_as_uint(x)
#define LDEXP(x, e) std::ldexp((x), (e))
static inline float host_as_float(uint u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
#define AS_FLOAT(u) host_as_float(u)
