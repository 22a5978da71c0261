// The shared kernel bodies as plain C++ functions, one loop iteration per GPU thread.
// Built by tests/test_kernels.py with the host compiler and called through ctypes.
#include "host.h"
#include "fake_quant.h"
#include "fp_quant.h"

#define CONSTANTS int KIND, int QN, int QP, int GROUP, int IN_FEATURES, int N_GROUPS, int N
#define PASS_CONSTANTS KIND, QN, QP, GROUP, IN_FEATURES, N_GROUPS, N

template <typename T>
void forward(const T* w, const float* alpha, T* out, CONSTANTS) {
  for (uint elem = 0; elem < uint(N); ++elem) {
#include "fake_quant_forward.inc"
  }
}

template <typename T>
void backward(const T* w, const float* alpha, const T* cotangent, T* dw, float* dalpha_elem, CONSTANTS) {
  for (uint elem = 0; elem < uint(N); ++elem) {
#include "fake_quant_backward.inc"
  }
}

#define EXPORT(SUFFIX, TYPE)                                                                        \
  extern "C" void forward_##SUFFIX(const TYPE* w, const float* alpha, TYPE* out, CONSTANTS) {       \
    forward<TYPE>(w, alpha, out, PASS_CONSTANTS);                                                   \
  }                                                                                                 \
  extern "C" void backward_##SUFFIX(const TYPE* w, const float* alpha, const TYPE* cotangent,       \
                                    TYPE* dw, float* dalpha_elem, CONSTANTS) {                      \
    backward<TYPE>(w, alpha, cotangent, dw, dalpha_elem, PASS_CONSTANTS);                           \
  }

EXPORT(f32, float)
#ifdef __FLT16_MAX__
EXPORT(f16, _Float16)
#endif

// The float formats' bodies (fp_quant_{forward,backward}.inc), one element per iteration.
#define FP_CONSTANTS int FMT, int GROUP, int N

template <typename T>
void fp_forward(const T* w, T* out, FP_CONSTANTS) {
  for (uint elem = 0; elem < uint(N); ++elem) {
#include "fp_quant_forward.inc"
  }
}

template <typename T>
void fp_backward(const T* w, const T* cotangent, T* dw, FP_CONSTANTS) {
  for (uint elem = 0; elem < uint(N); ++elem) {
#include "fp_quant_backward.inc"
  }
}

extern "C" void fp_forward_f32(const float* w, float* out, FP_CONSTANTS) {
  fp_forward<float>(w, out, FMT, GROUP, N);
}
extern "C" void fp_backward_f32(const float* w, const float* cotangent, float* dw, FP_CONSTANTS) {
  fp_backward<float>(w, cotangent, dw, FMT, GROUP, N);
}
