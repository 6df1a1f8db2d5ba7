// CUDA kernels of the grouped MoE. Determinism: per-block partial statistics combined by a second kernel in
// block order, fixed-tree block reductions, integer atomics only for counts, and a stable placement in which
// every slot's output row is computed from per-block prefix counts plus its rank inside its block. No float
// atomics anywhere.
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "unif2ace/cuda_utils.cuh"
#include "unif2ace/moe.h"

namespace unif2ace {
namespace moe {
namespace {

constexpr int kGateBlock = 256;   // tokens per gating block (one thread per token)
constexpr int kSortBlock = 256;   // slots per sort block (one thread per slot)
constexpr int kMaxExperts = 64;   // experts per group handled by the CUDA gating kernels
constexpr int kRowThreads = 256;  // threads per row in the row kernels
constexpr int64_t kMaxGrid = 65535;

int grid_for(int64_t n) { return static_cast<int>(n < kMaxGrid ? n : kMaxGrid); }

// Row kernels move V = 16 / sizeof(T) elements per thread and access (one 16-byte load or store) when the row width
// and the base pointers allow it, else V = 1. The arithmetic per element is the same either way, so sums over the
// k slots (fixed order j = 0..k-1) give the same bits on both paths.
// x rounded to T (the value a T store then load gives).
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  const T rounded = from_float<T>(x);
  return cuda::load_float(&rounded);
}

template <int V, typename T>
__device__ __forceinline__ void load_floats(const T* p, float* v) {
  if constexpr (V == 1) {
    v[0] = cuda::load_float(p);
  } else {
    static_assert(V * sizeof(T) == 16, "a vector access is 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = cuda::load_float(e + i);
  }
}

template <int V, typename T>
__device__ __forceinline__ void store_floats(T* p, const float* v) {
  if constexpr (V == 1) {
    p[0] = from_float<T>(v[0]);
  } else {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

bool vec16_ok(int64_t width, size_t elem, std::initializer_list<const void*> ptrs) {
  if ((width * static_cast<int64_t>(elem)) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Launches kernel<T, V> with V = 16 / sizeof(T) when vec16 holds, else V = 1.
template <typename T, typename Launch>
void launch_vec(bool vec16, Launch&& launch) {
  if (vec16) launch(std::integral_constant<int, 16 / static_cast<int>(sizeof(T))>{});
  else launch(std::integral_constant<int, 1>{});
}

// Loads token t's group logits, computes max and sum of exp, and the top-k local indices by logit (ties to the
// lower index). Returns false (and leaves sel untouched) for an out-of-range group.
template <typename T>
__device__ __forceinline__ void group_softmax(const T* row, int n_experts, float* v, float& row_max,
                                              float& inv_sum) {
  row_max = -INFINITY;
  for (int e = 0; e < n_experts; ++e) {
    v[e] = cuda::load_float(row + e);
    row_max = fmaxf(row_max, v[e]);
  }
  float sum = 0.0f;
  for (int e = 0; e < n_experts; ++e) sum += __expf(v[e] - row_max);
  inv_sum = 1.0f / sum;
}

__device__ __forceinline__ int pick_next(const float* v, int n_experts, uint64_t& taken) {
  int best = -1;
  for (int e = 0; e < n_experts; ++e) {
    if ((taken >> e) & 1ull) continue;
    if (best < 0 || v[e] > v[best]) best = e;
  }
  taken |= 1ull << best;
  return best;
}

template <typename T>
__global__ void gate_forward_kernel(const T* logits, int64_t n_tokens, int n_groups, int n_experts, int top_k,
                                    const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                                    float* gates, int64_t* expert_ids, float* partial_probs,
                                    int64_t* partial_counts, int64_t* partial_groups) {
  extern __shared__ int s_counts[];  // [NE] expert counts, then [G] group counts
  __shared__ float scratch[32];
  const int ne = n_groups * n_experts;
  for (int i = threadIdx.x; i < ne + n_groups; i += blockDim.x) s_counts[i] = 0;
  __syncthreads();

  const int64_t t = static_cast<int64_t>(blockIdx.x) * kGateBlock + threadIdx.x;
  float v[kMaxExperts];
  float row_max = 0.0f, inv_sum = 0.0f;
  int g = -1;
  bool counted = false;
  if (t < n_tokens) {
    const int64_t gid = group_ids[t];
    if (gid >= 0 && gid < n_groups) {
      g = static_cast<int>(gid);
      group_softmax(logits + t * ne + static_cast<int64_t>(g) * n_experts, n_experts, v, row_max, inv_sum);
      uint64_t taken = 0;
      int sel[kMaxExperts];
      float chosen = 0.0f;
      for (int j = 0; j < top_k; ++j) {
        sel[j] = pick_next(v, n_experts, taken);
        chosen += __expf(v[sel[j]] - row_max) * inv_sum;
      }
      const float scale = renormalize ? 1.0f / chosen : 1.0f;
      counted = token_mask == nullptr || token_mask[t] != 0;
      for (int j = 0; j < top_k; ++j) {
        gates[t * top_k + j] = __expf(v[sel[j]] - row_max) * inv_sum * scale;
        expert_ids[t * top_k + j] = static_cast<int64_t>(g) * n_experts + sel[j];
        if (counted) atomicAdd(&s_counts[g * n_experts + sel[j]], 1);
      }
      if (counted) atomicAdd(&s_counts[ne + g], 1);
    } else {
      for (int j = 0; j < top_k; ++j) {
        gates[t * top_k + j] = 0.0f;
        expert_ids[t * top_k + j] = -1;
      }
    }
  }
  // Per-block probability sums: one fixed-tree reduction per expert (every thread takes part).
  for (int ge = 0; ge < ne; ++ge) {
    const int e = ge - g * n_experts;
    const float contrib = (counted && e >= 0 && e < n_experts) ? __expf(v[e] - row_max) * inv_sum : 0.0f;
    const float sum = cuda::block_reduce<false>(contrib, scratch);
    if (threadIdx.x == 0) partial_probs[static_cast<int64_t>(blockIdx.x) * ne + ge] = sum;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < ne; i += blockDim.x)
    partial_counts[static_cast<int64_t>(blockIdx.x) * ne + i] = s_counts[i];
  for (int i = threadIdx.x; i < n_groups; i += blockDim.x)
    partial_groups[static_cast<int64_t>(blockIdx.x) * n_groups + i] = s_counts[ne + i];
}

// Combines the per-block partials in block order.
__global__ void gate_finalize_kernel(int64_t n_blocks, int n_groups, int n_experts, const float* partial_probs,
                                     const int64_t* partial_counts, const int64_t* partial_groups,
                                     int64_t* expert_counts, int64_t* group_counts, float* prob_mean) {
  const int ne = n_groups * n_experts;
  for (int g = threadIdx.x; g < n_groups; g += blockDim.x) {
    int64_t n = 0;
    for (int64_t b = 0; b < n_blocks; ++b) n += partial_groups[b * n_groups + g];
    group_counts[g] = n;
  }
  __syncthreads();
  for (int ge = threadIdx.x; ge < ne; ge += blockDim.x) {
    int64_t count = 0;
    float sum = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      count += partial_counts[b * ne + ge];
      sum += partial_probs[b * ne + ge];
    }
    const int64_t n = group_counts[ge / n_experts];
    expert_counts[ge] = count;
    prob_mean[ge] = n > 0 ? sum / static_cast<float>(n) : 0.0f;
  }
}

template <typename T>
__global__ void gate_backward_kernel(const T* logits, int64_t n_tokens, int n_groups, int n_experts, int top_k,
                                     const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                                     const int64_t* expert_ids, const int64_t* group_counts,
                                     const float* grad_gates, const float* grad_prob_mean, T* grad_logits) {
  const int ne = n_groups * n_experts;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n_tokens; t += stride) {
    T* out = grad_logits + t * ne;
    const int64_t gid = group_ids[t];
    if (gid < 0 || gid >= n_groups) {
      for (int c = 0; c < ne; ++c) out[c] = from_float<T>(0.0f);
      continue;
    }
    const int g = static_cast<int>(gid);
    float v[kMaxExperts], dp[kMaxExperts];
    float row_max, inv_sum;
    group_softmax(logits + t * ne + static_cast<int64_t>(g) * n_experts, n_experts, v, row_max, inv_sum);
    for (int e = 0; e < n_experts; ++e) {
      v[e] = __expf(v[e] - row_max) * inv_sum;  // v now holds p
      dp[e] = 0.0f;
    }
    if (grad_gates != nullptr) {
      const float* gg = grad_gates + t * top_k;
      const int64_t* ids = expert_ids + t * top_k;
      float chosen = 0.0f, dot = 0.0f;
      for (int j = 0; j < top_k; ++j) {
        const int64_t e = ids[j] - static_cast<int64_t>(g) * n_experts;
        if (e >= 0 && e < n_experts) chosen += v[e];
      }
      if (renormalize) {
        for (int j = 0; j < top_k; ++j) {
          const int64_t e = ids[j] - static_cast<int64_t>(g) * n_experts;
          if (e >= 0 && e < n_experts) dot += gg[j] * (v[e] / chosen);
        }
      }
      for (int j = 0; j < top_k; ++j) {
        const int64_t e = ids[j] - static_cast<int64_t>(g) * n_experts;
        if (e < 0 || e >= n_experts) continue;
        dp[e] += renormalize ? (gg[j] - dot) / chosen : gg[j];
      }
    }
    const bool counted = token_mask == nullptr || token_mask[t] != 0;
    if (grad_prob_mean != nullptr && counted && group_counts[g] > 0) {
      const float inv_n = 1.0f / static_cast<float>(group_counts[g]);
      for (int e = 0; e < n_experts; ++e) dp[e] += grad_prob_mean[g * n_experts + e] * inv_n;
    }
    float pdp = 0.0f;
    for (int e = 0; e < n_experts; ++e) pdp += v[e] * dp[e];
    for (int c = 0; c < ne; ++c) {
      const int e = c - g * n_experts;
      out[c] = from_float<T>((e >= 0 && e < n_experts) ? v[e] * (dp[e] - pdp) : 0.0f);
    }
  }
}

// ---- Sort ------------------------------------------------------------------------------------------------------
__device__ __forceinline__ int64_t bucket_of(int64_t id, int64_t n_experts) {
  return (id >= 0 && id < n_experts) ? id : n_experts;  // invalid ids go to the trailing bucket
}

__global__ void sort_histogram_kernel(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                      int64_t* block_counts) {
  extern __shared__ int s_hist[];  // [NE + 1]
  const int64_t nb = n_experts + 1;
  for (int64_t e = threadIdx.x; e < nb; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kSortBlock + threadIdx.x;
  if (s < n_slots) atomicAdd(&s_hist[bucket_of(expert_ids[s], n_experts)], 1);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < nb; e += blockDim.x) block_counts[blockIdx.x * nb + e] = s_hist[e];
}

// One block: bucket totals, their exclusive scan (expert_offsets), then each block's first row per bucket.
__global__ void sort_scan_kernel(int64_t n_blocks, int64_t n_experts, int64_t* block_counts,
                                 int64_t* expert_offsets) {
  extern __shared__ int64_t s_start[];  // [NE + 1]
  const int64_t nb = n_experts + 1;
  for (int64_t e = threadIdx.x; e < nb; e += blockDim.x) {
    int64_t total = 0;
    for (int64_t b = 0; b < n_blocks; ++b) total += block_counts[b * nb + e];
    s_start[e] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t running = 0;
    for (int64_t e = 0; e < nb; ++e) {
      const int64_t total = s_start[e];
      s_start[e] = running;
      expert_offsets[e] = running;  // e == NE: the start of the invalid bucket = the number of valid slots
      running += total;
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < nb; e += blockDim.x) {
    int64_t running = s_start[e];
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t count = block_counts[b * nb + e];
      block_counts[b * nb + e] = running;
      running += count;
    }
  }
}

__global__ void sort_place_kernel(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                  const int64_t* block_starts, int64_t* sorted_slot) {
  __shared__ int64_t s_bucket[kSortBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kSortBlock;
  const int64_t s = base + threadIdx.x;
  const int64_t bucket = s < n_slots ? bucket_of(expert_ids[s], n_experts) : -1;
  s_bucket[threadIdx.x] = bucket;
  __syncthreads();
  if (s >= n_slots) return;
  int64_t rank = 0;  // slots of the same bucket earlier in this block: a stable, schedule-independent rank
  for (int i = 0; i < static_cast<int>(threadIdx.x); ++i) rank += s_bucket[i] == bucket;
  sorted_slot[block_starts[blockIdx.x * (n_experts + 1) + bucket] + rank] = s;
}

__global__ void invert_kernel(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t s = sorted_slot[i];
    if (s >= 0 && s < n) slot_pos[s] = i;
  }
}

// ---- Rows --------------------------------------------------------------------------------------------------------
template <typename W>
__global__ void permute_rows_kernel(const W* src, int64_t n_tokens, int64_t words, int64_t top_k,
                                    const int64_t* sorted_slot, int64_t n_rows, W* out) {
  for (int64_t i = blockIdx.x; i < n_rows; i += gridDim.x) {
    const int64_t t = sorted_slot[i] / top_k;
    const bool ok = sorted_slot[i] >= 0 && t < n_tokens;
    W* o = out + i * words;
    const W* in = src + (ok ? t : 0) * words;
    for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
      if (ok) o[w] = in[w];
      else o[w] = W{};
    }
  }
}

template <typename T, int V>
__global__ void unpermute_sum_kernel(const T* rows, int64_t n_tokens, int64_t hidden, int64_t top_k,
                                     const int64_t* slot_pos, const float* weights, T* out) {
  const int64_t n = n_tokens * top_k;
  const int64_t chunks = hidden / V;
  for (int64_t t = blockIdx.x; t < n_tokens; t += gridDim.x) {
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float acc[V], v[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int64_t pos = slot_pos[t * top_k + j];
        if (pos < 0 || pos >= n) continue;
        const float w = weights != nullptr ? weights[t * top_k + j] : 1.0f;
        load_floats<V>(rows + pos * hidden + c * V, v);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += w * v[i];
      }
      store_floats<V>(out + t * hidden + c * V, acc);
    }
  }
}

template <typename T, int V>
__global__ void unpermute_sum_backward_kernel(const T* grad_out, const T* rows, int64_t n_tokens, int64_t hidden,
                                              int64_t top_k, const int64_t* sorted_slot, const float* weights,
                                              T* grad_rows, float* grad_weights) {
  __shared__ float scratch[32];
  const int64_t n = n_tokens * top_k;
  const int64_t chunks = hidden / V;
  for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const int64_t s = sorted_slot[i];
    const bool ok = s >= 0 && s < n;
    const float w = ok ? weights[s] : 0.0f;
    const T* go = grad_out + (ok ? s / top_k : 0) * hidden;
    const T* r = rows + i * hidden;
    T* gr = grad_rows + i * hidden;
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      float g[V], rv[V], out[V];
      if (ok) {
        load_floats<V>(go + c * V, g);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) g[e] = 0.0f;
      }
      load_floats<V>(r + c * V, rv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        out[e] = w * g[e];
        dot += g[e] * rv[e];
      }
      store_floats<V>(gr + c * V, out);
    }
    dot = cuda::block_reduce<false>(dot, scratch);
    if (threadIdx.x == 0 && ok) grad_weights[s] = dot;
  }
}

// One block per row; the caller guarantees distinct tokens across the rows, so no two blocks touch one output row.
template <typename T>
__global__ void scatter_add_rows_kernel(const T* rows, int64_t n_rows, int64_t hidden, int64_t top_k,
                                        const int64_t* slots, int64_t n_tokens, const float* weights, float* out) {
  for (int64_t i = blockIdx.x; i < n_rows; i += gridDim.x) {
    const int64_t s = slots[i];
    if (s < 0 || s / top_k >= n_tokens) continue;
    const float w = weights != nullptr ? weights[s] : 1.0f;
    const T* r = rows + i * hidden;
    float* o = out + (s / top_k) * hidden;
    for (int64_t h = threadIdx.x; h < hidden; h += blockDim.x) o[h] += w * cuda::load_float(r + h);
  }
}

// One block per row: GELU (tanh form) and its derivative per element, the row's dot product by a fixed-tree block
// reduction.
template <typename T, int V>
__global__ void gelu_tanh_backward_rows_kernel(const T* pre, const T* d_hid, int64_t n_rows, int64_t width,
                                               const float* row_weights, T* hid_w, T* d_pre, float* row_dot) {
  __shared__ float scratch[32];
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  const int64_t chunks = width / V;
  for (int64_t i = blockIdx.x; i < n_rows; i += gridDim.x) {
    const float w = row_weights != nullptr ? row_weights[i] : 1.0f;
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const int64_t at = i * width + c * V;
      float x[V], g[V], hw[V], dp[V];
      load_floats<V>(pre + at, x);
      load_floats<V>(d_hid + at, g);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // 1 + tanh(u) = 2·sigmoid(2u): no cancellation for negative x (see the CPU kernel).
        const float s = 1.0f / (1.0f + expf(-2.0f * k0 * (x[e] + k1 * x[e] * x[e] * x[e])));
        const float act = x[e] * s;
        const float grad = s + 2.0f * x[e] * s * (1.0f - s) * k0 * (1.0f + 3.0f * k1 * x[e] * x[e]);
        dot += g[e] * act;
        hw[e] = w * act;
        dp[e] = w * g[e] * grad;
      }
      if (hid_w != nullptr) store_floats<V>(hid_w + at, hw);
      store_floats<V>(d_pre + at, dp);
    }
    dot = cuda::block_reduce<false>(dot, scratch);
    if (threadIdx.x == 0 && row_dot != nullptr) row_dot[i] = dot;
  }
}

// One block per row: the row's expert bias added in place (rounded to T, the value the backward reads) and GELU (tanh
// form, the backward kernel's sigmoid formula) of the rounded sum.
template <typename T, int V>
__global__ void bias_gelu_tanh_rows_kernel(T* pre, const T* bias, int64_t n_rows, int64_t width,
                                           const int64_t* row_expert, int64_t n_groups, T* act) {
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;
  const int64_t chunks = width / V;
  for (int64_t i = blockIdx.x; i < n_rows; i += gridDim.x) {
    const int64_t e = row_expert[i];
    const bool has_bias = e >= 0 && e < n_groups;
    for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
      const int64_t at = i * width + c * V;
      float x[V], b[V], a[V];
      load_floats<V>(pre + at, x);
      if (has_bias) {
        load_floats<V>(bias + e * width + c * V, b);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) b[j] = 0.0f;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float v = round_to<T>(x[j] + b[j]);
        x[j] = v;
        const float s = 1.0f / (1.0f + expf(-2.0f * k0 * (v + k1 * v * v * v)));
        a[j] = v * s;
      }
      store_floats<V>(pre + at, x);
      store_floats<V>(act + at, a);
    }
  }
}

size_t dtype_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

Status reject_fp64(DType dtype, const char* op) {
  if (dtype == DType::kFloat64) return Status::Invalid(std::string(op) + ": float64 is supported on the CPU only");
  return Status::Ok();
}

}  // namespace

int64_t gate_block_tokens() { return kGateBlock; }
int64_t sort_block_slots() { return kSortBlock; }

Status gate_forward_cuda(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                         int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                         float* gates, int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                         float* prob_mean, float* partial_probs, int64_t* partial_counts, int64_t* partial_groups,
                         int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_gate");
  if (!st.ok()) return st;
  if (n_tokens < 0 || n_groups <= 0 || n_experts <= 0 || top_k <= 0 || top_k > n_experts)
    return Status::Invalid("moe_gate: need n_tokens >= 0, num_groups > 0 and 1 <= top_k <= experts per group");
  if (n_experts > kMaxExperts)
    return Status::Invalid("moe_gate: the CUDA kernel supports at most 64 experts per group");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n_blocks = (n_tokens + kGateBlock - 1) / kGateBlock;
  const int ne = static_cast<int>(n_groups * n_experts);
  if (n_blocks > 0) {
    const size_t shmem = static_cast<size_t>(ne + n_groups) * sizeof(int);
    dispatch_half_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      gate_forward_kernel<T><<<static_cast<unsigned>(n_blocks), kGateBlock, shmem, s>>>(
          static_cast<const T*>(logits), n_tokens, static_cast<int>(n_groups), static_cast<int>(n_experts),
          static_cast<int>(top_k), group_ids, token_mask, renormalize, gates, expert_ids, partial_probs,
          partial_counts, partial_groups);
    });
    st = cuda::check_launch("moe gate_forward kernel");
    if (!st.ok()) return st;
  }
  gate_finalize_kernel<<<1, 256, 0, s>>>(n_blocks, static_cast<int>(n_groups), static_cast<int>(n_experts),
                                         partial_probs, partial_counts, partial_groups, expert_counts, group_counts,
                                         prob_mean);
  return cuda::check_launch("moe gate_finalize kernel");
}

Status gate_backward_cuda(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                          int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                          const int64_t* expert_ids, const int64_t* group_counts, const float* grad_gates,
                          const float* grad_prob_mean, void* grad_logits, int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_gate backward");
  if (!st.ok()) return st;
  if (n_experts > kMaxExperts || n_experts <= 0 || n_groups <= 0 || top_k <= 0 || top_k > n_experts)
    return Status::Invalid("moe_gate backward: bad sizes (at most 64 experts per group on CUDA)");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_tokens == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    gate_backward_kernel<T><<<grid_for((n_tokens + 127) / 128), 128, 0, s>>>(
        static_cast<const T*>(logits), n_tokens, static_cast<int>(n_groups), static_cast<int>(n_experts),
        static_cast<int>(top_k), group_ids, token_mask, renormalize, expert_ids, group_counts, grad_gates,
        grad_prob_mean, static_cast<T*>(grad_logits));
  });
  return cuda::check_launch("moe gate_backward kernel");
}

Status sort_slots_cuda(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts, int64_t* expert_offsets,
                       int64_t* sorted_slot, int64_t* block_counts, int device, void* stream) {
  if (n_slots < 0 || n_experts <= 0) return Status::Invalid("moe_dispatch: need n_slots >= 0 and num_experts > 0");
  if (n_experts >= 4096) return Status::Invalid("moe_dispatch: the CUDA sort supports fewer than 4096 experts");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t n_blocks = (n_slots + kSortBlock - 1) / kSortBlock;
  const size_t nb = static_cast<size_t>(n_experts + 1);
  if (n_blocks > 0) {
    sort_histogram_kernel<<<static_cast<unsigned>(n_blocks), kSortBlock, nb * sizeof(int), s>>>(
        expert_ids, n_slots, n_experts, block_counts);
    Status st = cuda::check_launch("moe sort_histogram kernel");
    if (!st.ok()) return st;
  }
  sort_scan_kernel<<<1, 1024, nb * sizeof(int64_t), s>>>(n_blocks, n_experts, block_counts, expert_offsets);
  Status st = cuda::check_launch("moe sort_scan kernel");
  if (!st.ok() || n_blocks == 0) return st;
  sort_place_kernel<<<static_cast<unsigned>(n_blocks), kSortBlock, 0, s>>>(expert_ids, n_slots, n_experts,
                                                                            block_counts, sorted_slot);
  return cuda::check_launch("moe sort_place kernel");
}

Status invert_permutation_cuda(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos, int device, void* stream) {
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n == 0) return Status::Ok();
  invert_kernel<<<grid_for((n + 255) / 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(sorted_slot, n, slot_pos);
  return cuda::check_launch("moe invert_permutation kernel");
}

Status permute_rows_cuda(const void* src, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                         const int64_t* sorted_slot, int64_t n_rows, void* out, int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_dispatch");
  if (!st.ok()) return st;
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0 || hidden == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t bytes = hidden * static_cast<int64_t>(dtype_bytes(dtype));
  const bool aligned16 = bytes % 16 == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int grid = grid_for(n_rows);
  if (aligned16) {
    permute_rows_kernel<uint4><<<grid, kRowThreads, 0, s>>>(static_cast<const uint4*>(src), n_tokens, bytes / 16,
                                                            top_k, sorted_slot, n_rows, static_cast<uint4*>(out));
  } else {
    permute_rows_kernel<uint16_t><<<grid, kRowThreads, 0, s>>>(static_cast<const uint16_t*>(src), n_tokens,
                                                               bytes / 2, top_k, sorted_slot, n_rows,
                                                               static_cast<uint16_t*>(out));
  }
  return cuda::check_launch("moe permute_rows kernel");
}

Status unpermute_sum_cuda(const void* rows, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                          const int64_t* slot_pos, const float* weights, void* out, int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_combine");
  if (!st.ok()) return st;
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_tokens == 0 || hidden == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = vec16_ok(hidden, dtype_bytes(dtype), {rows, out});
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_vec<T>(vec, [&](auto v) {
      unpermute_sum_kernel<T, decltype(v)::value><<<grid_for(n_tokens), kRowThreads, 0, s>>>(
          static_cast<const T*>(rows), n_tokens, hidden, top_k, slot_pos, weights, static_cast<T*>(out));
    });
  });
  return cuda::check_launch("moe unpermute_sum kernel");
}

Status unpermute_sum_backward_cuda(const void* grad_out, const void* rows, DType dtype, int64_t n_tokens,
                                   int64_t hidden, int64_t top_k, const int64_t* sorted_slot, const float* weights,
                                   void* grad_rows, float* grad_weights, int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_combine backward");
  if (!st.ok()) return st;
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_tokens == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = vec16_ok(hidden, dtype_bytes(dtype), {grad_out, rows, grad_rows});
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_vec<T>(vec, [&](auto v) {
      unpermute_sum_backward_kernel<T, decltype(v)::value><<<grid_for(n_tokens * top_k), kRowThreads, 0, s>>>(
          static_cast<const T*>(grad_out), static_cast<const T*>(rows), n_tokens, hidden, top_k, sorted_slot,
          weights, static_cast<T*>(grad_rows), grad_weights);
    });
  });
  return cuda::check_launch("moe unpermute_sum_backward kernel");
}

Status scatter_add_rows_cuda(const void* rows, DType dtype, int64_t n_rows, int64_t hidden, int64_t top_k,
                             const int64_t* slots, int64_t n_tokens, const float* weights, float* out, int device,
                             void* stream) {
  Status st = reject_fp64(dtype, "moe_scatter_add_rows");
  if (!st.ok()) return st;
  if (top_k <= 0 || n_rows < 0 || hidden < 0 || n_tokens < 0)
    return Status::Invalid("moe_scatter_add_rows: need top_k > 0 and non-negative sizes");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0 || hidden == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    scatter_add_rows_kernel<T><<<grid_for(n_rows), kRowThreads, 0, s>>>(static_cast<const T*>(rows), n_rows, hidden,
                                                                        top_k, slots, n_tokens, weights, out);
  });
  return cuda::check_launch("moe scatter_add_rows kernel");
}

Status gelu_tanh_backward_rows_cuda(const void* pre, const void* d_hid, DType dtype, int64_t n_rows, int64_t width,
                                    const float* row_weights, void* hid_w, void* d_pre, float* row_dot, int device,
                                    void* stream) {
  Status st = reject_fp64(dtype, "moe_gelu_backward_rows");
  if (!st.ok()) return st;
  if (n_rows < 0 || width < 0) return Status::Invalid("moe_gelu_backward_rows: sizes must be non-negative");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = vec16_ok(width, dtype_bytes(dtype), {pre, d_hid, hid_w, d_pre});
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_vec<T>(vec, [&](auto v) {
      gelu_tanh_backward_rows_kernel<T, decltype(v)::value><<<grid_for(n_rows), kRowThreads, 0, s>>>(
          static_cast<const T*>(pre), static_cast<const T*>(d_hid), n_rows, width, row_weights,
          static_cast<T*>(hid_w), static_cast<T*>(d_pre), row_dot);
    });
  });
  return cuda::check_launch("moe gelu_tanh_backward_rows kernel");
}

Status bias_gelu_tanh_rows_cuda(void* pre, const void* bias, DType dtype, int64_t n_rows, int64_t width,
                                const int64_t* row_expert, int64_t n_groups, void* act, int device, void* stream) {
  Status st = reject_fp64(dtype, "moe_bias_gelu_rows");
  if (!st.ok()) return st;
  if (n_rows < 0 || width < 0 || n_groups <= 0)
    return Status::Invalid("moe_bias_gelu_rows: need non-negative sizes and at least one expert");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n_rows == 0 || width == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const bool vec = vec16_ok(width, dtype_bytes(dtype), {pre, bias, act});
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_vec<T>(vec, [&](auto v) {
      bias_gelu_tanh_rows_kernel<T, decltype(v)::value><<<grid_for(n_rows), kRowThreads, 0, s>>>(
          static_cast<T*>(pre), static_cast<const T*>(bias), n_rows, width, row_expert, n_groups,
          static_cast<T*>(act));
    });
  });
  return cuda::check_launch("moe bias_gelu_tanh_rows kernel");
}

}  // namespace moe
}  // namespace unif2ace
