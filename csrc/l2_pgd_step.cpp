// The uapx::l2_pgd_step ops: schema, the shared checks and layouts, and the CPU kernel.
#include <Python.h>  // first, as Python asks

#include "l2_pgd_step.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

// Importing uapx._C loads this library and with it the registrations below. (A JIT build is
// loaded as a plain library; this module object is then unused.)
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace uapx {
namespace {

void check_inputs(c10::DeviceType device, const at::Tensor& x, const at::Tensor& x0,
                  const at::Tensor& grad, double eps, double lo, double hi) {
  TORCH_CHECK(x.dim() >= 1, "uapx::l2_pgd_step: x must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(x.sizes() == x0.sizes() && x.sizes() == grad.sizes(),
              "uapx::l2_pgd_step: x, x0 and grad must have the same shape, got ", x.sizes(), ", ",
              x0.sizes(), " and ", grad.sizes());
  TORCH_CHECK(x.scalar_type() == x0.scalar_type() && x.scalar_type() == grad.scalar_type(),
              "uapx::l2_pgd_step: x, x0 and grad must have the same dtype, got ", x.scalar_type(),
              ", ", x0.scalar_type(), " and ", grad.scalar_type());
  TORCH_CHECK(x.device() == x0.device() && x.device() == grad.device(),
              "uapx::l2_pgd_step: x, x0 and grad must be on the same device, got ", x.device(), ", ",
              x0.device(), " and ", grad.device());
  TORCH_INTERNAL_ASSERT(x.device().type() == device);
  TORCH_CHECK(eps >= 0, "uapx::l2_pgd_step: eps must be >= 0, got ", eps);
  TORCH_CHECK(lo <= hi, "uapx::l2_pgd_step: lo must be <= hi, got lo=", lo, ", hi=", hi);
}

// True when the three tensors share one layout in which every row (sample) is one dense block
// of memory, e.g. all contiguous or all channels_last: the kernels then work on raw rows.
bool same_row_layout(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad) {
  return x.strides() == x0.strides() && x.strides() == grad.strides() &&
         x.is_non_overlapping_and_dense() &&
         (x.size(0) <= 1 || x.stride(0) * x.size(0) == x.numel());
}

}  // namespace

at::Tensor l2_pgd_step(StepKernel kernel, c10::DeviceType device, const at::Tensor& x,
                       const at::Tensor& x0, const at::Tensor& grad, double step_size, double eps,
                       double lo, double hi) {
  check_inputs(device, x, x0, grad, eps, lo, hi);
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous, as the reference returns
  if (out.numel() > 0) {
    kernel(x.contiguous(), x0.contiguous(), grad.contiguous(), out, {step_size, eps, lo, hi});
  }
  return out;
}

void l2_pgd_step_(StepKernel kernel, c10::DeviceType device, at::Tensor& x, const at::Tensor& x0,
                  const at::Tensor& grad, double step_size, double eps, double lo, double hi) {
  check_inputs(device, x, x0, grad, eps, lo, hi);
  if (x.numel() == 0) {
    return;
  }
  if (same_row_layout(x, x0, grad)) {
    at::assert_no_partial_overlap(x, x0);
    at::assert_no_partial_overlap(x, grad);
    kernel(x, x0, grad, x, {step_size, eps, lo, hi});
  } else {  // a contiguous step, copied back into x's layout
    x.copy_(l2_pgd_step(kernel, device, x, x0, grad, step_size, eps, lo, hi));
  }
}

namespace {

// target_clones compiles the row loops for AVX-512, AVX2 and the baseline; the loader picks the
// best one the CPU has, so one build is fast everywhere without -march=native. FP contraction is
// off (setup.py), so every clone gives the same bits. Their helpers are forced inline, or they
// would be compiled for the baseline only.
#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define UAPX_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define UAPX_INLINE __attribute__((always_inline)) inline
#else
#define UAPX_TARGET_CLONES
#define UAPX_INLINE inline
#endif

// Elements per block of the write loop and independent float32 accumulators of a sum: the
// compiler turns each block into vector instructions (four independent ones for a sum).
constexpr int64_t kLanes = 16;
constexpr int64_t kSumLanes = 64;
// A sum's accumulators go into a float64 total every kFlush elements, so each one adds at most
// kFlush / kSumLanes float32 terms (relative error ~1e-7, well under the tests' 1e-6).
constexpr int64_t kFlush = 1024;

// sum_i term(i)^2 over [0, d).
template <typename Term>
UAPX_INLINE double sum_of_squares(int64_t d, const Term& term) {
  double total[kSumLanes] = {};
  for (int64_t begin = 0; begin < d; begin += kFlush) {
    const int64_t end = std::min(d, begin + kFlush);
    float acc[kSumLanes] = {};
    int64_t i = begin;
    for (; i + kSumLanes <= end; i += kSumLanes) {
      for (int64_t j = 0; j < kSumLanes; ++j) {
        const float t = term(i + j);
        acc[j] += t * t;
      }
    }
    for (int64_t j = 0; i + j < end; ++j) {
      const float t = term(i + j);
      acc[j] += t * t;
    }
    for (int64_t j = 0; j < kSumLanes; ++j) {
      total[j] += acc[j];
    }
  }
  for (int64_t width = kSumLanes / 2; width > 0; width /= 2) {  // a tree: no long chain of adds
    for (int64_t j = 0; j < width; ++j) {
      total[j] += total[j + width];
    }
  }
  return total[0];
}

UAPX_TARGET_CLONES double grad_norm2(const float* g, int64_t d) {
  return sum_of_squares(d, [&](int64_t i) { return g[i]; });
}

UAPX_TARGET_CLONES double delta_norm2(const float* x, const float* x0, const float* g, float scale,
                                      int64_t d) {
  return sum_of_squares(d, [&](int64_t i) { return step_delta(x[i], x0[i], g[i], scale); });
}

// out may be x: each block reads all its inputs before it writes, so aliasing cannot change it.
UAPX_TARGET_CLONES void write_row(const float* x, const float* x0, const float* g, float* out,
                                  int64_t d, float scale, float fac, float lo, float hi) {
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    float v[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) {
      v[j] = step_value(x[i + j], x0[i + j], g[i + j], scale, fac, lo, hi);
    }
    std::copy(v, v + kLanes, out + i);
  }
  for (; i < d; ++i) {
    out[i] = step_value(x[i], x0[i], g[i], scale, fac, lo, hi);
  }
}

// Rows in parallel; a row takes three passes (||g||, ||delta||, the write), the last two mostly
// from the cache. One parallel region per call: per-row synchronisation stalls on a busy machine.
void step_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
              const at::Tensor& out, const StepArgs& args) {
  TORCH_CHECK(x.scalar_type() == at::kFloat,
              "uapx::l2_pgd_step: the CPU kernel takes float32 tensors, got ", x.scalar_type(),
              " (uapx.ops.l2_pgd_step runs the reference for other dtypes)");
  const int64_t n = x.size(0), d = x.numel() / n;
  const float* xp = x.const_data_ptr<float>();
  const float* x0p = x0.const_data_ptr<float>();
  const float* gp = grad.const_data_ptr<float>();
  float* outp = out.mutable_data_ptr<float>();
  const auto lo = static_cast<float>(args.lo), hi = static_cast<float>(args.hi);
  // A task gets at least ~32k elements, so small batches stay on one thread.
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / d), [&](int64_t begin, int64_t end) {
    for (int64_t off = begin * d; off < end * d; off += d) {
      const float scale = step_scale(grad_norm2(gp + off, d), args.step_size);
      const float fac = projection_factor(delta_norm2(xp + off, x0p + off, gp + off, scale, d), args.eps);
      write_row(xp + off, x0p + off, gp + off, outp + off, d, scale, fac, lo, hi);
    }
  });
}

at::Tensor l2_pgd_step_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                           double step_size, double eps, double lo, double hi) {
  return l2_pgd_step(step_cpu, c10::DeviceType::CPU, x, x0, grad, step_size, eps, lo, hi);
}

void l2_pgd_step_cpu_(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, double step_size,
                      double eps, double lo, double hi) {
  l2_pgd_step_(step_cpu, c10::DeviceType::CPU, x, x0, grad, step_size, eps, lo, hi);
}

}  // namespace
}  // namespace uapx

TORCH_LIBRARY(uapx, m) {
  m.set_python_module("uapx.ops");  // where the fake (meta) implementations live
  m.def("l2_pgd_step(Tensor x, Tensor x0, Tensor grad, float step_size, float eps, float lo, "
        "float hi) -> Tensor");
  // Returns nothing: torch.compile cannot functionalize a custom op whose output aliases an input.
  m.def("l2_pgd_step_(Tensor(a!) x, Tensor x0, Tensor grad, float step_size, float eps, float lo, "
        "float hi) -> ()");
}

TORCH_LIBRARY_IMPL(uapx, CPU, m) {
  m.impl("l2_pgd_step", &uapx::l2_pgd_step_cpu);
  m.impl("l2_pgd_step_", &uapx::l2_pgd_step_cpu_);
}
