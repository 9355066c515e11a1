// The fused PGD-L2 step shared by the CPU (l2_pgd_step.cpp) and CUDA (cuda/l2_pgd_step.cu) kernels.
//
// Per sample (dim 0, flattened):
//   g_hat = g / (||g|| + 1e-12);  delta = x + step_size * g_hat - x0;
//   delta *= min(1, eps / ||delta||);  x_new = clamp(x0 + delta, lo, hi)
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>

#if defined(__CUDACC__)
#define UAPX_HOST_DEVICE __host__ __device__
#else
#define UAPX_HOST_DEVICE
#endif

namespace uapx {

// The scalar arguments of the op's schema.
struct StepArgs {
  double step_size;
  double eps;
  double lo;
  double hi;
};

// One row's step, in the float32 arithmetic of the reference (uapx.ops.l2_pgd_step_reference):
//   scale = step_size / (||g|| + 1e-12)              step_scale
//   delta_i = (x_i + scale * g_i) - x0_i             step_delta
//   fac = min(1, eps / ||delta||), 1 if delta = 0    projection_factor
//   x_new_i = clamp(x0_i + fac * delta_i, lo, hi)    step_value
// The kernels differ only in how they get the norms.

UAPX_HOST_DEVICE inline float step_scale(double grad_norm2, double step_size) {
  return static_cast<float>(step_size / (sqrt(grad_norm2) + 1e-12));
}

UAPX_HOST_DEVICE inline float step_delta(float x, float x0, float g, float scale) {
  return (x + scale * g) - x0;
}

UAPX_HOST_DEVICE inline float projection_factor(double delta_norm2, double eps) {
  const double norm = sqrt(delta_norm2);
  return norm > eps ? static_cast<float>(eps / norm) : 1.0f;
}

// The clamp is a max then a min (one instruction each on a CPU); a NaN passes, as in torch.clamp.
UAPX_HOST_DEVICE inline float step_value(float x, float x0, float g, float scale, float fac, float lo,
                                         float hi) {
  const float v = x0 + fac * step_delta(x, x0, g, scale);
  const float above_lo = lo > v ? lo : v;
  return above_lo > hi ? hi : above_lo;
}

// Writes the step of the rows of x, x0 and grad into out. The four tensors have the same sizes,
// dtype, device and row layout (see same_row_layout); out may be x itself.
using StepKernel = void (*)(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                            const at::Tensor& out, const StepArgs& args);

// The op on top of a device's kernel: argument checks, layouts, the functional and in-place forms.
at::Tensor l2_pgd_step(StepKernel kernel, c10::DeviceType device, const at::Tensor& x,
                       const at::Tensor& x0, const at::Tensor& grad, double step_size, double eps,
                       double lo, double hi);
void l2_pgd_step_(StepKernel kernel, c10::DeviceType device, at::Tensor& x, const at::Tensor& x0,
                  const at::Tensor& grad, double step_size, double eps, double lo, double hi);

}  // namespace uapx
