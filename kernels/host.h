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
