// CUDA kernels of uapx::l2_pgd_step(_) and their registration; the schema is in l2_pgd_step.cpp.
//
// A row (sample) is cut into chunks of kChunk elements, one block each. Kernel 1 reduces every
// chunk to three partial sums, ||g||^2, ||x - x0||^2 and <x - x0, g>; kernel 2 adds up a row's
// partial sums (in a fixed order, so results are deterministic), gets ||delta|| from them and
// writes the chunk. Each input is read twice, the second time from L2 when the batch fits there.
// Arithmetic is float32 (float16/bfloat16 are converted on load), the sums are float64.
#include "../l2_pgd_step.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE headers
#include <torch/library.h>

#include <limits>

namespace uapx {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = kThreads * 16;

// Per-row sums, in float64: ||g||^2, ||d||^2 and <d, g> with d = x - x0.
struct RowSums {
  double gg;
  double dd;
  double dg;
};

__device__ inline RowSums& operator+=(RowSums& a, const RowSums& b) {
  a.gg += b.gg;
  a.dd += b.dd;
  a.dg += b.dg;
  return a;
}

// delta = d + s g with s = step_scale(||g||^2), so ||delta||^2 = ||d||^2 + s (2 <d, g> + s ||g||^2):
// one pass gives both norms. In float64, the cancellation when the step lands back near x0 stays
// far below float32 rounding (the clamp at 0 absorbs what is left).
__device__ inline double delta_norm2(const RowSums& s, float scale) {
  return fmax(s.dd + scale * (2.0 * s.dg + scale * s.gg), 0.0);
}

__device__ inline double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ inline RowSums warp_sums(const RowSums& s) {
  return {warp_sum(s.gg), warp_sum(s.dd), warp_sum(s.dg)};
}

// The sums over the block's threads; the result is valid in thread 0.
__device__ RowSums block_sums(RowSums s) {
  __shared__ RowSums warp_totals[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  s = warp_sums(s);
  if (lane == 0) {
    warp_totals[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    s = warp_sums(lane < kWarps ? warp_totals[lane] : RowSums{0.0, 0.0, 0.0});
  }
  return s;
}

// Block b reduces chunk b % chunks of row b / chunks into partial[b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_sums_kernel(const T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                    int64_t d, int64_t chunks, RowSums* __restrict__ partial) {
  const int64_t row = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * kChunk;
  const int64_t end = min(d, begin + kChunk), off = row * d;
  RowSums s{0.0, 0.0, 0.0};
  for (int64_t i = off + begin + threadIdx.x; i < off + end; i += kThreads) {
    const double gi = static_cast<float>(g[i]);
    const double di = static_cast<double>(static_cast<float>(x[i])) - static_cast<float>(x0[i]);
    s += RowSums{gi * gi, di * di, di * gi};
  }
  s = block_sums(s);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = s;
  }
}

// Block b writes chunk b % chunks of row b / chunks. out may be x (the in-place op): every
// element is read and then written by the same thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    row_write_kernel(const T* x, const T* __restrict__ x0, const T* __restrict__ g, T* out, int64_t d,
                     int64_t chunks, const RowSums* __restrict__ partial, double step_size,
                     double eps, float lo, float hi) {
  __shared__ float coefs[2];  // scale, projection factor
  const int64_t row = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * kChunk;
  if (threadIdx.x < 32) {  // warp 0 adds up the row's partial sums
    RowSums s{0.0, 0.0, 0.0};
    for (int64_t c = threadIdx.x; c < chunks; c += 32) {
      s += partial[row * chunks + c];
    }
    s = warp_sums(s);
    if (threadIdx.x == 0) {
      coefs[0] = step_scale(s.gg, step_size);
      coefs[1] = projection_factor(delta_norm2(s, coefs[0]), eps);
    }
  }
  __syncthreads();
  const float scale = coefs[0], fac = coefs[1];
  const int64_t end = min(d, begin + kChunk), off = row * d;
  for (int64_t i = off + begin + threadIdx.x; i < off + end; i += kThreads) {
    const float v = step_value(static_cast<float>(x[i]), static_cast<float>(x0[i]),
                               static_cast<float>(g[i]), scale, fac, lo, hi);
    out[i] = static_cast<T>(v);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& out,
            const StepArgs& args) {
  const int64_t n = x.size(0), d = x.numel() / n;
  const int64_t chunks = (d + kChunk - 1) / kChunk, blocks = n * chunks;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "uapx::l2_pgd_step: ", n, " rows of ", d,
              " elements need ", blocks, " CUDA blocks, more than one launch takes");
  const at::Tensor partial = at::empty({blocks * 3}, x.options().dtype(at::kDouble));
  auto* sums = reinterpret_cast<RowSums*>(partial.mutable_data_ptr<double>());
  const T* xp = x.const_data_ptr<T>();
  const T* x0p = x0.const_data_ptr<T>();
  const T* gp = grad.const_data_ptr<T>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  row_sums_kernel<T><<<blocks, kThreads, 0, stream>>>(xp, x0p, gp, d, chunks, sums);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_write_kernel<T><<<blocks, kThreads, 0, stream>>>(
      xp, x0p, gp, out.mutable_data_ptr<T>(), d, chunks, sums, args.step_size, args.eps,
      static_cast<float>(args.lo), static_cast<float>(args.hi));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void step_cuda(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
               const at::Tensor& out, const StepArgs& args) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "uapx::l2_pgd_step: the CUDA kernel takes float32, float16 or bfloat16 tensors, got ",
              x.scalar_type(), " (uapx.ops.l2_pgd_step runs the reference for other dtypes)");
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_SWITCH(x.scalar_type(), "uapx::l2_pgd_step",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch<scalar_t>(x, x0, grad, out, args); })
                     AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(
                         [&] { launch<scalar_t>(x, x0, grad, out, args); }));
}

at::Tensor l2_pgd_step_cuda(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                            double step_size, double eps, double lo, double hi) {
  return l2_pgd_step(step_cuda, c10::DeviceType::CUDA, x, x0, grad, step_size, eps, lo, hi);
}

void l2_pgd_step_cuda_(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, double step_size,
                       double eps, double lo, double hi) {
  l2_pgd_step_(step_cuda, c10::DeviceType::CUDA, x, x0, grad, step_size, eps, lo, hi);
}

}  // namespace
}  // namespace uapx

TORCH_LIBRARY_IMPL(uapx, CUDA, m) {
  m.impl("l2_pgd_step", &uapx::l2_pgd_step_cuda);
  m.impl("l2_pgd_step_", &uapx::l2_pgd_step_cuda_);
}
