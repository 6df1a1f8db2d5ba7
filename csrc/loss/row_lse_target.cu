// CUDA row kernels of the D3Diff loss: one thread block per row (grid-stride over rows), fp32 accumulation,
// fixed-order block reductions (bit-identical across runs), no atomics.
#include <cmath>

#include "unif2ace/cuda_utils.cuh"
#include "unif2ace/loss.h"

namespace unif2ace {
namespace loss {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;

template <typename T>
__device__ float block_row_lse(const T* row, int64_t n_cols, float* scratch) {
  float m = -INFINITY;
  for (int64_t k = threadIdx.x; k < n_cols; k += blockDim.x) m = fmaxf(m, cuda::load_float(row + k));
  m = cuda::block_reduce<true>(m, scratch);
  if (isinf(m)) return m;
  float s = 0.0f;
  for (int64_t k = threadIdx.x; k < n_cols; k += blockDim.x) s += __expf(cuda::load_float(row + k) - m);
  s = cuda::block_reduce<false>(s, scratch);
  return m + logf(s);
}

template <typename T>
__global__ void lse_target_kernel(const T* logits, int64_t n_rows, int64_t n_cols, const int64_t* target,
                                  int64_t ignore_index, float* lse, float* target_logit) {
  __shared__ float scratch[32];
  for (int64_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const int64_t y = target[n];
    if (y == ignore_index) {
      if (threadIdx.x == 0) lse[n] = 0.0f, target_logit[n] = 0.0f;
      continue;
    }
    if (y < 0 || y >= n_cols) {
      if (threadIdx.x == 0) lse[n] = NAN, target_logit[n] = NAN;
      continue;
    }
    const T* row = logits + n * n_cols;
    const float value = block_row_lse(row, n_cols, scratch);
    if (threadIdx.x == 0) lse[n] = value, target_logit[n] = cuda::load_float(row + y);
  }
}

template <typename T>
__global__ void grad_kernel(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, const float* lse,
                            const int64_t* target, int64_t ignore_index, const float* coef_softmax,
                            const float* coef_onehot) {
  for (int64_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const int64_t y = target[n];
    const bool active = y != ignore_index && y >= 0 && y < n_cols;
    const T* row = logits + n * n_cols;
    T* out = grad + n * n_cols;
    const float row_lse_value = active ? lse[n] : 0.0f;
    const float a = active ? coef_softmax[n] : 0.0f;
    const float b = active ? coef_onehot[n] : 0.0f;
    // Each element is read and written by the same thread, so in place is safe.
    for (int64_t k = threadIdx.x; k < n_cols; k += blockDim.x) {
      float g = active ? a * __expf(cuda::load_float(row + k) - row_lse_value) : 0.0f;
      if (k == y) g -= b;
      out[k] = from_float<T>(g);
    }
  }
}

int grid_for(int64_t n_rows) { return static_cast<int>(n_rows < kMaxBlocks ? n_rows : kMaxBlocks); }

}  // namespace

Status row_lse_target_cuda(const void* logits, DType dtype, int64_t n_rows, int64_t n_cols, const int64_t* target,
                           int64_t ignore_index, float* lse, float* target_logit, int device, void* stream) {
  if (n_rows < 0 || n_cols <= 0) return Status::Invalid("row_lse_target: need n_rows >= 0 and n_cols > 0");
  if (dtype == DType::kFloat64) return Status::Invalid("row_lse_target: float64 logits are supported on the CPU only");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    lse_target_kernel<T><<<grid_for(n_rows), kThreads, 0, s>>>(static_cast<const T*>(logits), n_rows, n_cols,
                                                                 target, ignore_index, lse, target_logit);
  });
  return cuda::check_launch("row_lse_target kernel");
}

Status softmax_onehot_grad_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols,
                                const float* lse, const int64_t* target, int64_t ignore_index,
                                const float* coef_softmax, const float* coef_onehot, int device, void* stream) {
  if (n_rows < 0 || n_cols <= 0) return Status::Invalid("softmax_onehot_grad: need n_rows >= 0 and n_cols > 0");
  if (dtype == DType::kFloat64) return Status::Invalid("softmax_onehot_grad: float64 logits are supported on the CPU only");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    grad_kernel<T><<<grid_for(n_rows), kThreads, 0, s>>>(static_cast<const T*>(logits), static_cast<T*>(grad),
                                                           n_rows, n_cols, lse, target, ignore_index, coef_softmax,
                                                           coef_onehot);
  });
  return cuda::check_launch("softmax_onehot_grad kernel");
}

}  // namespace loss
}  // namespace unif2ace
