// The fused CPU fake-quant kernel: two MLX primitives (forward, backward) that run the shared
// per-element math of fake_quant.h over whole groups, vectorized by the compiler and split
// across cores. Built by mlx_qat/cpu.py as a Python extension in MLX's nanobind domain.
// One pass each way: forward reads w and writes ŵ; backward reads w and the upstream gradient,
// writes dw (into the upstream gradient's buffer when MLX may donate it) and reduces the α
// gradient per group in vector registers (`omp simd reduction`: build with -fopenmp-simd).
#include "host.h"
#include "fake_quant.h"
#include "fp_quant.h"

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>

#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace {

// Work below this many elements per thread is not worth a thread. Inside a train step the other
// cores are often busy (MLX's graph dispatch, BLAS workers waiting for the next matmul), and a new
// thread can wait a scheduler time slice (milliseconds) for one: on 2 cores, threading the small
// config's 196k-element weights made the QAT step 8% slower than the FP step instead of 0.2%.
constexpr size_t MIN_ELEMENTS_PER_THREAD = size_t(1) << 21;

// A fresh multi-megabyte output is a new mapping: written 4 KiB page by page, its page faults
// cost as much as the kernel itself. Ask Linux for 2 MiB pages instead (harmless if refused).
void prefer_huge_pages(mx::array& a) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t HUGE_PAGE = uintptr_t(2) << 20;
  if (a.nbytes() < 4 * HUGE_PAGE) {
    return;
  }
  uintptr_t start = (reinterpret_cast<uintptr_t>(a.data<char>()) + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
  uintptr_t end = (reinterpret_cast<uintptr_t>(a.data<char>()) + a.nbytes()) & ~(HUGE_PAGE - 1);
  if (end > start) {
    madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);
  }
#endif
}

// Run f(first, last) over [0, n) groups of `group` elements, split across the machine's cores.
template <typename F>
void parallel_groups(size_t n, size_t group, F f) {
  size_t threads = std::min<size_t>(std::max(1u, std::thread::hardware_concurrency()),
                                    n * group / MIN_ELEMENTS_PER_THREAD);
  if (threads <= 1) {
    f(size_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  size_t chunk = (n + threads - 1) / threads;
  for (size_t first = chunk; first < n; first += chunk) {
    pool.emplace_back(f, first, std::min(n, first + chunk));
  }
  f(size_t(0), std::min(n, chunk));
  for (auto& t : pool) {
    t.join();
  }
}

template <typename T, int KIND>
void forward_groups(const T* w, const float* alpha, T* out, int qn, int qp, size_t group, size_t first,
                    size_t last) {
  for (size_t g = first; g < last; ++g) {
    float a = group_scale(alpha[g]);
    const T* wg = w + g * group;
    T* og = out + g * group;
    for (size_t i = 0; i < group; ++i) {
      og[i] = T(fake_quant_value(float(wg[i]), a, KIND, qn, qp));
    }
  }
}

template <typename T, int KIND>
void backward_groups(const T* w, const float* alpha, const T* cot, T* dw, float* dalpha, int qn, int qp,
                     float grad_scale, size_t group, size_t first, size_t last) {
  for (size_t g = first; g < last; ++g) {
    float a = group_scale(alpha[g]);
    const T* wg = w + g * group;
    const T* cg = cot + g * group;
    T* dg = dw + g * group;  // may be cg itself (a donated buffer): each i reads before it writes
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < group; ++i) {
      float x = DIV(float(wg[i]), a);
      float c = float(cg[i]);
      dg[i] = fake_quant_passes(x, KIND, qn, qp) ? cg[i] : T(0.0f);
      sum += MUL(c, fake_quant_unit(x, KIND, qn, qp));
    }
    dalpha[g] = MUL(sum, grad_scale);
  }
}

// The float formats (fp_quant.h), a group at a time: its amax once, then every element.
template <typename T>
float fp_group_amax(const T* wg, size_t group) {
  float amax = 0.0f;
  for (size_t i = 0; i < group; ++i) {
    float m = ABS(float(wg[i]));
    amax = m > amax ? m : amax;
  }
  return amax;
}

template <typename T, int FMT>
void fp_forward_groups(const T* w, T* out, size_t group, size_t first, size_t last) {
  for (size_t g = first; g < last; ++g) {
    const T* wg = w + g * group;
    T* og = out + g * group;
    float amax = fp_group_amax(wg, group);
    float divisor = fp_divisor(amax, FMT), dequant = fp_dequant(amax, FMT);
    for (size_t i = 0; i < group; ++i) {
      og[i] = T(MUL(fp_round(DIV(float(wg[i]), divisor), FMT), dequant));
    }
  }
}

template <typename T, int FMT>
void fp_backward_groups(const T* w, const T* cot, T* dw, size_t group, size_t first, size_t last) {
  for (size_t g = first; g < last; ++g) {
    const T* wg = w + g * group;
    const T* cg = cot + g * group;
    T* dg = dw + g * group;  // may be cg itself (a donated buffer): each i reads before it writes
    float divisor = fp_divisor(fp_group_amax(wg, group), FMT), top = fp_element_max(FMT);
    for (size_t i = 0; i < group; ++i) {
      dg[i] = ABS(DIV(float(wg[i]), divisor)) <= top ? cg[i] : T(0.0f);
    }
  }
}

// Call f with (a value of) the weight type.
template <typename F>
void dispatch_type(mx::Dtype dtype, F f) {
  switch (dtype) {
    case mx::float32: return f(float{});
    case mx::float16: return f(mx::float16_t{});
    case mx::bfloat16: return f(mx::bfloat16_t{});
    default: throw std::invalid_argument("fake_quant: weights must be float32, float16 or bfloat16");
  }
}

// An output's buffer: the donor's when it may be taken over (the backward writes dw over the
// cotangent it no longer needs), else a fresh one.
void allocate(mx::array& out, const mx::array* donor = nullptr) {
  if (donor != nullptr && donor->is_donatable() && donor->flags().row_contiguous) {
    out.copy_shared_buffer(*donor);
    return;
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  prefer_huge_pages(out);
}

// The stream's command encoder, told what the next task reads and writes.
mx::cpu::CommandEncoder& encoder_for(mx::Stream stream, const std::vector<mx::array>& inputs,
                                     std::initializer_list<mx::array*> outputs) {
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) {
    encoder.set_input_array(a);
  }
  for (auto* a : outputs) {
    encoder.set_output_array(*a);
  }
  return encoder;
}

// Call f with the weight type and the quantizer kind as compile-time constants.
template <typename F>
void dispatch(mx::Dtype dtype, int kind, F f) {
  dispatch_type(dtype, [&](auto type_tag) {
    switch (kind) {
      case 0: return f(type_tag, std::integral_constant<int, 0>{});
      case 1: return f(type_tag, std::integral_constant<int, 1>{});
      case 2: return f(type_tag, std::integral_constant<int, 2>{});
      default: return f(type_tag, std::integral_constant<int, 3>{});
    }
  });
}

struct Params {
  int kind, qn, qp, group;
  float grad_scale = 0;  // the backward's
  bool operator==(const Params&) const = default;
};

// What each primitive here shares: its parameters (equal parameters, equivalent primitives for
// MLX's graph simplification), its name, and no GPU path (the GPU kernels are in gpu.py).
template <typename Base, typename P>
class CpuPrimitive : public Base {
 public:
  CpuPrimitive(mx::Stream stream, P p, const char* name) : Base(stream), p_(p), name_(name) {}

  const char* name() const override { return name_; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const CpuPrimitive*>(&other);
    return o != nullptr && name_ == o->name_ && p_ == o->p_;
  }

 protected:
  [[noreturn]] static void cpu_only() {
    throw std::runtime_error("the fused CPU fake-quant kernel runs on the CPU only");
  }

  P p_;

 private:
  const char* name_;
};

class FakeQuantForward : public CpuPrimitive<mx::UnaryPrimitive, Params> {
 public:
  FakeQuantForward(mx::Stream stream, Params p) : CpuPrimitive(stream, p, "FakeQuantForward") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& w = inputs[0];
    auto& alpha = inputs[1];
    allocate(out);
    auto& encoder = encoder_for(stream(), inputs, {&out});
    encoder.dispatch([w = mx::array::unsafe_weak_copy(w), alpha = mx::array::unsafe_weak_copy(alpha),
                      out = mx::array::unsafe_weak_copy(out), p = p_]() mutable {
      dispatch(out.dtype(), p.kind, [&](auto type_tag, auto kind) {
        using T = decltype(type_tag);
        const T* wp = w.data<T>();
        const float* ap = alpha.data<float>();
        T* op = out.data<T>();
        parallel_groups(alpha.size(), p.group, [&](size_t first, size_t last) {
          forward_groups<T, kind.value>(wp, ap, op, p.qn, p.qp, p.group, first, last);
        });
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { cpu_only(); }
};

class FakeQuantBackward : public CpuPrimitive<mx::Primitive, Params> {
 public:
  FakeQuantBackward(mx::Stream stream, Params p) : CpuPrimitive(stream, p, "FakeQuantBackward") {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& w = inputs[0];
    auto& alpha = inputs[1];
    auto& cot = inputs[2];
    auto& dw = outputs[0];
    auto& dalpha = outputs[1];
    allocate(dw, &cot);
    allocate(dalpha);
    auto& encoder = encoder_for(stream(), inputs, {&dw, &dalpha});
    encoder.dispatch([w = mx::array::unsafe_weak_copy(w), alpha = mx::array::unsafe_weak_copy(alpha),
                      cot = mx::array::unsafe_weak_copy(cot), dw = mx::array::unsafe_weak_copy(dw),
                      dalpha = mx::array::unsafe_weak_copy(dalpha), p = p_]() mutable {
      dispatch(dw.dtype(), p.kind, [&](auto type_tag, auto kind) {
        using T = decltype(type_tag);
        const T* wp = w.data<T>();
        const float* ap = alpha.data<float>();
        const T* cp = cot.data<T>();
        T* dwp = dw.data<T>();
        float* dap = dalpha.data<float>();
        parallel_groups(alpha.size(), p.group, [&](size_t first, size_t last) {
          backward_groups<T, kind.value>(wp, ap, cp, dwp, dap, p.qn, p.qp, p.grad_scale, p.group, first, last);
        });
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { cpu_only(); }
};

// Call f with the weight type and the float format as compile-time constants.
template <typename F>
void fp_dispatch(mx::Dtype dtype, int fmt, F f) {
  dispatch_type(dtype, [&](auto type_tag) {
    switch (fmt) {
      case 0: return f(type_tag, std::integral_constant<int, 0>{});
      case 1: return f(type_tag, std::integral_constant<int, 1>{});
      default: return f(type_tag, std::integral_constant<int, 2>{});
    }
  });
}

struct FpParams {
  int fmt, group;
  bool operator==(const FpParams&) const = default;
};

class FpQuantForward : public CpuPrimitive<mx::UnaryPrimitive, FpParams> {
 public:
  FpQuantForward(mx::Stream stream, FpParams p) : CpuPrimitive(stream, p, "FpQuantForward") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& w = inputs[0];
    allocate(out);
    auto& encoder = encoder_for(stream(), inputs, {&out});
    encoder.dispatch([w = mx::array::unsafe_weak_copy(w), out = mx::array::unsafe_weak_copy(out), p = p_]() mutable {
      fp_dispatch(out.dtype(), p.fmt, [&](auto type_tag, auto fmt) {
        using T = decltype(type_tag);
        const T* wp = w.data<T>();
        T* op = out.data<T>();
        parallel_groups(w.size() / p.group, p.group, [&](size_t first, size_t last) {
          fp_forward_groups<T, fmt.value>(wp, op, p.group, first, last);
        });
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { cpu_only(); }
};

class FpQuantBackward : public CpuPrimitive<mx::UnaryPrimitive, FpParams> {
 public:
  FpQuantBackward(mx::Stream stream, FpParams p) : CpuPrimitive(stream, p, "FpQuantBackward") {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& dw) override {
    auto& w = inputs[0];
    auto& cot = inputs[1];
    allocate(dw, &cot);
    auto& encoder = encoder_for(stream(), inputs, {&dw});
    encoder.dispatch([w = mx::array::unsafe_weak_copy(w), cot = mx::array::unsafe_weak_copy(cot),
                      dw = mx::array::unsafe_weak_copy(dw), p = p_]() mutable {
      fp_dispatch(dw.dtype(), p.fmt, [&](auto type_tag, auto fmt) {
        using T = decltype(type_tag);
        const T* wp = w.data<T>();
        const T* cp = cot.data<T>();
        T* dwp = dw.data<T>();
        parallel_groups(w.size() / p.group, p.group, [&](size_t first, size_t last) {
          fp_backward_groups<T, fmt.value>(wp, cp, dwp, p.group, first, last);
        });
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { cpu_only(); }
};

// Checked here rather than trusted: a wrong shape would read out of bounds.
Params checked(const mx::array& w, const mx::array& alpha, int kind, int qn, int qp) {
  if (w.ndim() != 2 || alpha.ndim() != 2 || alpha.shape(0) != w.shape(0) || alpha.shape(1) == 0 ||
      w.shape(1) % alpha.shape(1) != 0) {
    throw std::invalid_argument("fake_quant: needs W [out, in] and alpha [out, groups] with groups dividing in");
  }
  return Params{kind, qn, qp, w.shape(1) / alpha.shape(1)};
}

mx::Stream cpu_stream() {
  return mx::default_stream(mx::Device(mx::Device::cpu));
}

// The primitives read row-contiguous arrays: α as float32, everything else in the weight's type.
mx::array prepared(const mx::array& a, mx::Dtype dtype, mx::Stream s) {
  return mx::contiguous(mx::astype(a, dtype, s), false, s);
}

mx::array forward(const mx::array& w, const mx::array& alpha, int kind, int qn, int qp) {
  auto p = checked(w, alpha, kind, qn, qp);
  auto s = cpu_stream();
  std::vector<mx::array> inputs = {prepared(w, w.dtype(), s), prepared(alpha, mx::float32, s)};
  return mx::array(w.shape(), w.dtype(), std::make_shared<FakeQuantForward>(s, p), std::move(inputs));
}

std::pair<mx::array, mx::array> backward(const mx::array& w, const mx::array& alpha, const mx::array& cotangent,
                                         int kind, int qn, int qp, float grad_scale) {
  auto p = checked(w, alpha, kind, qn, qp);
  p.grad_scale = grad_scale;
  if (cotangent.shape() != w.shape()) {
    throw std::invalid_argument("fake_quant: the cotangent must have the weight's shape");
  }
  auto s = cpu_stream();
  std::vector<mx::array> inputs = {prepared(w, w.dtype(), s), prepared(alpha, mx::float32, s),
                                   prepared(cotangent, w.dtype(), s)};
  auto outputs = mx::array::make_arrays({w.shape(), alpha.shape()}, {w.dtype(), mx::float32},
                                        std::make_shared<FakeQuantBackward>(s, p), inputs);
  return {outputs[0], outputs[1]};
}

FpParams fp_checked(const mx::array& w, int fmt, int group) {
  if (w.ndim() != 2 || group <= 0 || w.shape(1) % group != 0 || fmt < 0 || fmt > 2) {
    throw std::invalid_argument("fake_quant_fp: needs W [out, in] with in a multiple of the group, and a format 0..2");
  }
  return FpParams{fmt, group};
}

mx::array fp_forward(const mx::array& w, int fmt, int group) {
  auto p = fp_checked(w, fmt, group);
  auto s = cpu_stream();
  return mx::array(w.shape(), w.dtype(), std::make_shared<FpQuantForward>(s, p), {prepared(w, w.dtype(), s)});
}

mx::array fp_backward(const mx::array& w, const mx::array& cotangent, int fmt, int group) {
  auto p = fp_checked(w, fmt, group);
  if (cotangent.shape() != w.shape()) {
    throw std::invalid_argument("fake_quant_fp: the cotangent must have the weight's shape");
  }
  auto s = cpu_stream();
  return mx::array(w.shape(), w.dtype(), std::make_shared<FpQuantBackward>(s, p),
                   {prepared(w, w.dtype(), s), prepared(cotangent, w.dtype(), s)});
}

}  // namespace

NB_MODULE(_fake_quant_cpu, m) {
  namespace nb = nanobind;
  using namespace nb::literals;
  m.doc() = "The fused CPU fake-quant kernel (forward and straight-through backward).";
  m.def("forward", &forward, "w"_a, "alpha"_a, "kind"_a, "qn"_a, "qp"_a,
        "ŵ on the affine grid of alpha; kind is the spec's Quantizer.kernel_id (0 binary, 1 ternary, 2 SEQ 2-bit, 3 LSQ).");
  m.def("backward", &backward, "w"_a, "alpha"_a, "cotangent"_a, "kind"_a, "qn"_a, "qp"_a, "grad_scale"_a,
        "(dw, dalpha): straight-through gradient and the per-group alpha gradient times grad_scale.");
  m.def("fp_forward", &fp_forward, "w"_a, "fmt"_a, "group"_a,
        "ŵ in a float format, its scale derived per group; fmt is fp_formats.KERNEL_IDS' (0 mxfp4, 1 nvfp4, 2 mxfp8).");
  m.def("fp_backward", &fp_backward, "w"_a, "cotangent"_a, "fmt"_a, "group"_a,
        "dw: the straight-through gradient (the cotangent where the element is not clipped).");
}
