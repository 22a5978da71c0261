// The shared kernel bodies as plain C++ functions, one loop iteration per GPU thread.
// Built by tests/test_kernels.py with the host compiler and called through ctypes.
#include "host.h"

#define THREAD_INDEX thread
#define CONSTANTS int KIND, int QN, int QP, int GROUP, int IN_FEATURES, int N_GROUPS, int N

extern "C" void forward_f32(const float* w, const float* alpha, float* out, CONSTANTS) {
  typedef float T;
  for (uint thread = 0; thread < uint(N); ++thread) {
#include "fake_quant_forward.inc"
  }
}

extern "C" void backward_f32(const float* w, const float* alpha, const float* cotangent, float* dw,
                             float* dalpha_elem, CONSTANTS) {
  typedef float T;
  for (uint thread = 0; thread < uint(N); ++thread) {
#include "fake_quant_backward.inc"
  }
}

#ifdef __FLT16_MAX__
extern "C" void forward_f16(const _Float16* w, const float* alpha, _Float16* out, CONSTANTS) {
  typedef _Float16 T;
  for (uint thread = 0; thread < uint(N); ++thread) {
#include "fake_quant_forward.inc"
  }
}

extern "C" void backward_f16(const _Float16* w, const float* alpha, const _Float16* cotangent, _Float16* dw,
                             float* dalpha_elem, CONSTANTS) {
  typedef _Float16 T;
  for (uint thread = 0; thread < uint(N); ++thread) {
#include "fake_quant_backward.inc"
  }
}
#endif
