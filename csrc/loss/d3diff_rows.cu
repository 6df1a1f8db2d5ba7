// CUDA D3Diff row kernels: one thread block per row (grid-stride over rows, several rows resident per SM), 16-byte
// vector loads and stores over the aligned middle of each row, an online max/sum so the statistics take one read of
// the row, fixed-order block reductions (bit-identical across runs), no atomics.
#include <cmath>

#include "unif2ace/cuda_utils.cuh"
#include "unif2ace/loss.h"

namespace unif2ace {
namespace loss {
namespace {

constexpr int kMaxBlocks = 65535;

// Elements of T in one 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int kSize = 16 / sizeof(T);
  union {
    uint4 raw;
    T v[kSize];
  };
};

// A row of n elements at p, split into a scalar head (up to the first 16-byte boundary), 16-byte vectors, and a
// scalar tail. Rows of a padded buffer start aligned (head = 0); rows of an odd width do not.
template <typename T>
struct RowSplit {
  int64_t head, n_vec, tail_begin;
  __device__ RowSplit(const T* p, int64_t n) {
    const int64_t misaligned = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) % 16) / sizeof(T));
    head = misaligned == 0 ? 0 : min(n, static_cast<int64_t>(Vec<T>::kSize) - misaligned);
    n_vec = (n - head) / Vec<T>::kSize;
    tail_begin = head + n_vec * Vec<T>::kSize;
  }
};

// Running (max, Σ exp(x − max)) of one thread. −inf entries contribute nothing; NaN and +inf make the sum NaN.
struct MaxSum {
  float m = -INFINITY, s = 0.0f;

  __device__ void add_block(const float* x, int count) {
    float block_max = m;
    for (int i = 0; i < count; ++i) block_max = fmaxf(block_max, x[i]);
    if (block_max == -INFINITY) {  // nothing above -inf yet (NaNs are caught below through the sum)
      for (int i = 0; i < count; ++i) s += (x[i] == x[i]) ? 0.0f : x[i];
      return;
    }
    if (block_max != m) s = (m == -INFINITY) ? 0.0f : s * __expf(m - block_max);
    m = block_max;
    for (int i = 0; i < count; ++i) s += __expf(x[i] - m);
  }
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  MaxSum r;
  r.m = fmaxf(a.m, b.m);
  if (r.m == -INFINITY) {
    r.s = a.s + b.s;  // 0, or NaN carried along
    return r;
  }
  r.s = (a.m == -INFINITY ? a.s : a.s * __expf(a.m - r.m)) + (b.m == -INFINITY ? b.s : b.s * __expf(b.m - r.m));
  return r;
}

// Block-wide (max, sum) with a fixed shuffle tree; the result is broadcast to every thread. scratch: 2·32 floats.
__device__ MaxSum block_max_sum(MaxSum v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, offset);
    v = combine(v, o);
  }
  __syncthreads();  // scratch may still be read by the previous row
  if (lane == 0) scratch[warp] = v.m, scratch[32 + warp] = v.s;
  __syncthreads();
  MaxSum w;
  if (lane < n_warps) w.m = scratch[lane], w.s = scratch[32 + lane];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    MaxSum o;
    o.m = __shfl_xor_sync(0xffffffffu, w.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, w.s, offset);
    w = combine(w, o);
  }
  return w;
}

template <typename T>
__device__ MaxSum row_max_sum(const T* row, int64_t n_cols, float* scratch) {
  const RowSplit<T> split(row, n_cols);
  MaxSum acc;
  for (int64_t k = threadIdx.x; k < split.head; k += blockDim.x) {
    const float x = cuda::load_float(row + k);
    acc.add_block(&x, 1);
  }
  const Vec<T>* vec = reinterpret_cast<const Vec<T>*>(row + split.head);
  for (int64_t i = threadIdx.x; i < split.n_vec; i += blockDim.x) {
    Vec<T> v;
    v.raw = vec[i].raw;
    float x[Vec<T>::kSize];
#pragma unroll
    for (int j = 0; j < Vec<T>::kSize; ++j) x[j] = to_float(v.v[j]);
    acc.add_block(x, Vec<T>::kSize);
  }
  for (int64_t k = split.tail_begin + threadIdx.x; k < n_cols; k += blockDim.x) {
    const float x = cuda::load_float(row + k);
    acc.add_block(&x, 1);
  }
  return block_max_sum(acc, scratch);
}

// out[k] = a·exp((z_k − m) − l) − b·[k == y_local] over one row; each element is read and written by the same
// thread, so out may alias row. Vectors are used when both rows sit at the same offset from a 16-byte boundary.
template <typename T>
__device__ void write_grad_row(const T* row, T* out, int64_t n_cols, float m, float l, float a, float b,
                               int64_t y_local) {
  auto one = [&](int64_t k) {
    float g = a * __expf((cuda::load_float(row + k) - m) - l);
    if (k == y_local) g -= b;
    out[k] = from_float<T>(g);
  };
  if (reinterpret_cast<uintptr_t>(row) % 16 != reinterpret_cast<uintptr_t>(out) % 16) {
    for (int64_t k = threadIdx.x; k < n_cols; k += blockDim.x) one(k);
    return;
  }
  const RowSplit<T> split(row, n_cols);
  for (int64_t k = threadIdx.x; k < split.head; k += blockDim.x) one(k);
  const Vec<T>* src = reinterpret_cast<const Vec<T>*>(row + split.head);
  Vec<T>* dst = reinterpret_cast<Vec<T>*>(out + split.head);
  for (int64_t i = threadIdx.x; i < split.n_vec; i += blockDim.x) {
    Vec<T> v;
    v.raw = src[i].raw;
    const int64_t k0 = split.head + i * Vec<T>::kSize;
#pragma unroll
    for (int j = 0; j < Vec<T>::kSize; ++j) {
      float g = a * __expf((to_float(v.v[j]) - m) - l);
      if (k0 + j == y_local) g -= b;
      v.v[j] = from_float<T>(g);
    }
    dst[i].raw = v.raw;
  }
  for (int64_t k = split.tail_begin + threadIdx.x; k < n_cols; k += blockDim.x) one(k);
}

template <typename T>
__device__ void zero_row(T* out, int64_t n_cols) {
  for (int64_t k = threadIdx.x; k < n_cols; k += blockDim.x) out[k] = from_float<T>(0.0f);
}

template <typename T>
__global__ void rows_forward_kernel(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, int64_t ld,
                                    const int64_t* target, const float* row_weight, const float* row_scale,
                                    D3DiffOptions opts, float* loss, float* row_max, float* log_sum) {
  __shared__ float scratch[64];
  const float alpha = static_cast<float>(opts.alpha);
  const float log_k = logf(static_cast<float>(opts.n_classes));
  for (int64_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const int64_t y = target[n];
    const T* row = logits + n * ld;
    T* out = grad != nullptr ? grad + n * ld : nullptr;
    if (y == opts.ignore_index || y < 0 || y >= n_cols) {
      const float value = y == opts.ignore_index ? 0.0f : NAN;
      if (threadIdx.x == 0) loss[n] = row_max[n] = log_sum[n] = value;
      if (out != nullptr) zero_row(out, n_cols);
      continue;
    }
    // Read before the reduction's barrier: an in-place gradient pass may overwrite z_y right after it.
    const float z_y = cuda::load_float(row + y);
    const MaxSum stats = row_max_sum(row, n_cols, scratch);
    const float l = logf(stats.s);
    const float scale = row_scale != nullptr ? row_scale[n] : 0.0f;
    const D3DiffRowTerms<float> t = d3diff_row_terms<float>(stats.m, l, z_y, row_weight[n], alpha, opts.sedd, log_k,
                                                            scale);
    if (threadIdx.x == 0) loss[n] = t.loss, row_max[n] = stats.m, log_sum[n] = l;
    if (out != nullptr) write_grad_row(row, out, n_cols, stats.m, l, t.coef_softmax, t.coef_onehot, y);
  }
}

template <typename T>
__global__ void rows_grad_kernel(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, int64_t ld, int64_t col0,
                                 const int64_t* target, const float* row_weight, const float* row_max,
                                 const float* log_sum, const float* row_scale, D3DiffOptions opts) {
  const float alpha = static_cast<float>(opts.alpha);
  const float log_k = logf(static_cast<float>(opts.n_classes));
  for (int64_t n = blockIdx.x; n < n_rows; n += gridDim.x) {
    const int64_t y = target[n];
    T* out = grad + n * ld;
    if (y == opts.ignore_index || y < 0 || y >= opts.n_classes) {
      zero_row(out, n_cols);
      continue;
    }
    const float m = row_max[n], l = log_sum[n];
    const D3DiffRowTerms<float> t = d3diff_row_terms<float>(m, l, 0.0f, row_weight[n], alpha, opts.sedd, log_k,
                                                            row_scale[n]);
    const int64_t y_local = (y >= col0 && y < col0 + n_cols) ? y - col0 : -1;
    write_grad_row(logits + n * ld, out, n_cols, m, l, t.coef_softmax, t.coef_onehot, y_local);
  }
}

// Threads per row: 512 for a whole large vocabulary (a row chunk of a few hundred rows must still fill every SM with
// loads in flight), 256 for long rows, 128 for short ones (a vocabulary slice of a few thousand columns, many rows).
int threads_for(int64_t n_cols) { return n_cols >= 32768 ? 512 : (n_cols >= 4096 ? 256 : 128); }
int grid_for(int64_t n_rows) { return static_cast<int>(n_rows < kMaxBlocks ? n_rows : kMaxBlocks); }

}  // namespace

Status d3diff_rows_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                        const int64_t* target, const float* row_weight, const float* row_scale,
                        const D3DiffOptions& opts, float* loss, float* row_max, float* log_sum, int device,
                        void* stream) {
  Status s = check_d3diff_args(n_rows, n_cols, ld, 0, opts, "d3diff_rows");
  if (!s.ok()) return s;
  if (n_cols != opts.n_classes) return Status::Invalid("d3diff_rows: whole rows are needed (n_cols == n_classes)");
  if (grad != nullptr && row_scale == nullptr) return Status::Invalid("d3diff_rows: a gradient needs row_scale");
  if (dtype == DType::kFloat64) return Status::Invalid("d3diff_rows: float64 logits are supported on the CPU only");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0) return Status::Ok();
  auto st = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    rows_forward_kernel<T><<<grid_for(n_rows), threads_for(n_cols), 0, st>>>(
        static_cast<const T*>(logits), static_cast<T*>(grad), n_rows, n_cols, ld, target, row_weight, row_scale,
        opts, loss, row_max, log_sum);
  });
  return cuda::check_launch("d3diff_rows kernel");
}

Status d3diff_rows_grad_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                             int64_t col0, const int64_t* target, const float* row_weight, const float* row_max,
                             const float* log_sum, const float* row_scale, const D3DiffOptions& opts, int device,
                             void* stream) {
  Status s = check_d3diff_args(n_rows, n_cols, ld, col0, opts, "d3diff_rows_grad");
  if (!s.ok()) return s;
  if (dtype == DType::kFloat64)
    return Status::Invalid("d3diff_rows_grad: float64 logits are supported on the CPU only");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0) return Status::Ok();
  auto st = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    rows_grad_kernel<T><<<grid_for(n_rows), threads_for(n_cols), 0, st>>>(
        static_cast<const T*>(logits), static_cast<T*>(grad), n_rows, n_cols, ld, col0, target, row_weight, row_max,
        log_sum, row_scale, opts);
  });
  return cuda::check_launch("d3diff_rows_grad kernel");
}

}  // namespace loss
}  // namespace unif2ace
