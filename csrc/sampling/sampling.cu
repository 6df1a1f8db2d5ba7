// CUDA sampling kernels: the fused MaskGIT step (a row kernel and a per-sequence selection kernel),
// next-token sampling and raw Philox noise.
//
// Bit-identical to the CPU kernels: the same fp32 operations in the same order for every per-element value
// (explicit fmaf, __fmul_rn / __fsub_rn so nothing is contracted), integer masses whose sums do not depend on
// the reduction order, and Philox blocks indexed by row. No float atomics; the only atomics are integer
// histogram counts in shared memory, whose results do not depend on their order. No host synchronisation.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "row_draw.h"
#include "unif2ace/cuda_utils.cuh"
#include "unif2ace/philox.h"
#include "unif2ace/sampling.h"

namespace unif2ace {
namespace sampling {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGrid = 65535;
constexpr int64_t kMaxCachedVocab = 12288;  // rows up to 48 KB of fp32 are kept in shared memory

int grid_for(int64_t n) { return static_cast<int>(n < kMaxGrid ? (n > 0 ? n : 1) : kMaxGrid); }

// ---- block-wide integer helpers (fixed shuffle trees) ----
__device__ __forceinline__ uint64_t warp_sum_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ uint64_t block_sum_u64(uint64_t v, uint64_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum_u64(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0;
  return warp_sum_u64(v);
}

// Exclusive prefix over threads (thread order) of v; *total gets the block sum.
__device__ uint64_t block_exclusive_scan_u64(uint64_t v, uint64_t* scratch, uint64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  uint64_t warp_off = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    const uint64_t s = scratch[w];
    warp_off += w < warp ? s : 0;
    sum += s;
  }
  *total = sum;
  return warp_off + incl - v;
}

// ---- per-element values, in exactly the CPU's operations ----
template <typename T>
__device__ __forceinline__ float tempered(const T* cond, const T* uncond, int64_t k, float g, float inv_t) {
  const float c = cuda::load_float(cond + k);
  if (uncond == nullptr) return __fmul_rn(c, inv_t);
  const float d = __fsub_rn(c, cuda::load_float(uncond + k));
  return __fmul_rn(fmaf(g, d, c), inv_t);
}

__device__ __forceinline__ uint32_t mass_at(float z, float m) {
  return detail::mass_of(repro::exp_nonpos(__fsub_rn(z, m)));
}

// Row draw shared by both samplers. `value(k)` returns z'_k, `weight(k, q)` may zero a mass (top-k/p filter).
// Threads own contiguous chunks; the chunk sums are scanned exactly, and the chunk holding u is searched by
// its owner, which gets the drawn index; every other thread gets -1.
template <typename ValueFn, typename KeepFn>
__device__ int64_t draw_row(int64_t K, float m, uint64_t r64, ValueFn value, KeepFn keep, uint64_t* scratch,
                            uint64_t* total_out) {
  const int64_t chunk = (K + blockDim.x - 1) / blockDim.x;
  const int64_t begin = threadIdx.x * chunk;
  const int64_t end = begin + chunk < K ? begin + chunk : K;
  const int64_t len = end > begin ? end - begin : 0;
  uint64_t local = 0;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t k = begin + (j + threadIdx.x) % len;  // skewed order: no shared-memory bank conflicts
    local += keep(k) ? mass_at(value(k), m) : 0u;
  }
  uint64_t total = 0;
  const uint64_t excl = block_exclusive_scan_u64(local, scratch, &total);
  *total_out = total;
  const uint64_t u = philox::mulhi64(r64, total);
  int64_t found = -1;
  if (local > 0 && excl <= u && u < excl + local) {
    uint64_t run = excl;
    for (int64_t k = begin; k < end; ++k) {
      run += keep(k) ? mass_at(value(k), m) : 0u;
      if (run > u) {
        found = k;
        break;
      }
    }
  }
  return found;
}

// ---- MaskGIT: kernel 1, one block per row ----
template <typename T, bool kCached>
__global__ void maskgit_rows_kernel(const T* cond, const T* uncond, const int64_t* tokens, MaskGitParams p,
                                    int64_t* sampled, float* confidence) {
  extern __shared__ float zs[];
  __shared__ float fscratch[32];
  __shared__ uint64_t uscratch[32];
  const int64_t rows = p.batch * p.seq_len, K = p.vocab;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t tok = tokens[i];
    if (tok >= 0 && tok < K) {  // known (anything else, mask_id or out of range, is resampled)
      if (threadIdx.x == 0) sampled[i] = tok, confidence[i] = INFINITY;
      continue;
    }
    const T* crow = cond + i * K;
    const T* urow = uncond ? uncond + i * K : nullptr;
    float m = -INFINITY;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float z = tempered(crow, urow, k, p.guidance_scale, p.inv_temperature);
      if (kCached) zs[k] = z;
      m = fmaxf(m, z);
      bad |= (z != z) | (z == INFINITY);
    }
    m = cuda::block_reduce<true>(m, fscratch);
    bad = __syncthreads_or(bad);
    if (bad || !(m > -INFINITY)) {
      if (threadIdx.x == 0) sampled[i] = 0, confidence[i] = -INFINITY;
      __syncthreads();
      continue;
    }
    auto value = [&](int64_t k) {
      return kCached ? zs[k] : tempered(crow, urow, k, p.guidance_scale, p.inv_temperature);
    };
    const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i));
    uint64_t total = 0;
    const int64_t x = draw_row(K, m, philox::block_uniform64(blk), value, [](int64_t) { return true; }, uscratch,
                               &total);
    if (x >= 0) {
      const float logp = __fsub_rn(__fsub_rn(value(x), m), detail::log_norm(total));
      sampled[i] = x;
      confidence[i] = fmaf(p.noise_scale, philox::block_gumbel(blk), logp);
    }
    __syncthreads();  // zs and the scratch are reused by the next row
  }
}

// ---- MaskGIT: kernel 2, one block per sequence: radix select of the n lowest (confidence, position) ----
__global__ void maskgit_select_kernel(const int64_t* tokens, const int64_t* sampled, const float* confidence,
                                      MaskGitParams p, int64_t* new_tokens) {
  __shared__ int hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_need;
  __shared__ int warp_count[kWarps];
  const int64_t N = p.seq_len, K = p.vocab;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const int64_t* tok = tokens + b * N;
    const float* conf = confidence + b * N;
    int64_t masked = 0;
    for (int64_t base = 0; base < N; base += blockDim.x) {
      const int64_t n = base + threadIdx.x;
      masked += __syncthreads_count(n < N && (tok[n] < 0 || tok[n] >= K));
      if (n < N) new_tokens[b * N + n] = sampled[b * N + n];
    }
    const int64_t count = detail::remask_count(p, masked);
    if (count == 0) continue;  // uniform across the block
    // The key of rank count-1 (0-based, ascending), digit by digit from the top.
    if (threadIdx.x == 0) s_prefix = 0, s_need = count - 1;
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int h = threadIdx.x; h < 256; h += blockDim.x) hist[h] = 0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
        const uint32_t key = detail::ordered_key(conf[n]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t need = s_need, acc = 0;
        int bin = 0;
        for (; bin < 255; ++bin) {
          if (acc + hist[bin] > need) break;
          acc += hist[bin];
        }
        s_need = need - acc;
        s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      }
      mask |= 0xffu << shift;
      __syncthreads();
    }
    const uint32_t t = s_prefix;
    const int64_t equal_quota = s_need + 1;  // positions with key == t to re-mask, lowest positions first
    int64_t running = 0;
    for (int64_t base = 0; base < N; base += blockDim.x) {
      const int64_t n = base + threadIdx.x;
      const uint32_t key = n < N ? detail::ordered_key(conf[n]) : 0xffffffffu;
      const bool eq = n < N && key == t;
      const uint32_t ballot = __ballot_sync(0xffffffffu, eq);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();
      int64_t before = 0, chunk_total = 0;
      for (int w = 0; w < kWarps; ++w) {
        before += w < warp ? warp_count[w] : 0;
        chunk_total += warp_count[w];
      }
      const int64_t rank = running + before + __popc(ballot & ((1u << lane) - 1u));
      if (n < N && (key < t || (eq && rank < equal_quota))) new_tokens[b * N + n] = p.mask_id;
      running += chunk_total;
      __syncthreads();
    }
  }
}

// ---- next-token sampling: one block per row, values recomputed from global memory (L2) per pass ----
template <typename T>
__global__ void next_token_kernel(const T* logits, NextTokenParams p, int64_t* out) {
  __shared__ float fscratch[32];
  __shared__ uint64_t uscratch[32];
  __shared__ unsigned long long hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ unsigned long long s_need;
  __shared__ unsigned long long s_found;
  const int64_t V = p.vocab;
  const float inv_t = p.greedy ? 1.0f : p.inv_temperature;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const T* row = logits + b * V;
    auto value = [&](int64_t k) { return __fmul_rn(cuda::load_float(row + k), inv_t); };
    float m = -INFINITY;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < V; k += blockDim.x) {
      const float z = value(k);
      m = fmaxf(m, z);
      bad |= (z != z) | (z == INFINITY);
    }
    m = cuda::block_reduce<true>(m, fscratch);
    bad = __syncthreads_or(bad);
    if (bad || !(m > -INFINITY)) {
      if (threadIdx.x == 0) out[b] = 0;
      __syncthreads();
      continue;
    }
    if (p.greedy) {  // the first index holding the maximum: each thread's first hit, then an integer min
      unsigned long long idx = static_cast<unsigned long long>(V);
      for (int64_t k = threadIdx.x; k < V; k += blockDim.x)
        if (value(k) == m) {
          idx = static_cast<unsigned long long>(k);
          break;
        }
      if (threadIdx.x == 0) s_found = static_cast<unsigned long long>(V);
      __syncthreads();
      if (idx < static_cast<unsigned long long>(V)) atomicMin(&s_found, idx);
      __syncthreads();
      if (threadIdx.x == 0) out[b] = static_cast<int64_t>(s_found);
      __syncthreads();
      continue;
    }
    const bool use_k = p.top_k > 0 && p.top_k < V;
    const bool use_p = p.top_p < 1.0;
    uint32_t t = 0;
    for (int pass = 0; pass < 2; ++pass) {
      const bool weighted = pass == 1;
      if ((pass == 0 && !use_k) || (pass == 1 && !use_p)) continue;
      unsigned long long need = 0;
      if (!weighted) {
        need = static_cast<unsigned long long>(p.top_k);
      } else {
        uint64_t kept = 0;
        for (int64_t k = threadIdx.x; k < V; k += blockDim.x) {
          const float z = value(k);
          kept += detail::ordered_key(z) >= t ? mass_at(z, m) : 0u;
        }
        kept = block_sum_u64(kept, uscratch);
        const double need_d = ceil(p.top_p * static_cast<double>(kept));
        need = need_d < 1.0 ? 1ull : static_cast<unsigned long long>(need_d);
        if (need > kept) need = kept;
      }
      const uint32_t floor_key = t;
      if (threadIdx.x == 0) s_prefix = 0, s_need = need;
      uint32_t mask = 0;
      for (int shift = 24; shift >= 0; shift -= 8) {
        for (int h = threadIdx.x; h < 256; h += blockDim.x) hist[h] = 0;
        __syncthreads();
        const uint32_t prefix = s_prefix;
        for (int64_t k = threadIdx.x; k < V; k += blockDim.x) {
          const float z = value(k);
          const uint32_t key = detail::ordered_key(z);
          if (key < floor_key || (key & mask) != prefix) continue;
          atomicAdd(&hist[(key >> shift) & 0xffu], weighted ? static_cast<unsigned long long>(mass_at(z, m)) : 1ull);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          unsigned long long rem = s_need, acc = 0;
          int bin = 255;
          for (; bin > 0; --bin) {
            if (acc + hist[bin] >= rem) break;
            acc += hist[bin];
          }
          s_need = rem - acc;
          s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
        }
        mask |= 0xffu << shift;
        __syncthreads();
      }
      t = s_prefix;
    }
    const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(b));
    uint64_t total = 0;
    const int64_t x = draw_row(
        V, m, philox::block_uniform64(blk), value,
        [&](int64_t k) { return detail::ordered_key(value(k)) >= t; }, uscratch, &total);
    if (x >= 0) out[b] = x;
    __syncthreads();
  }
}

__global__ void philox_noise_kernel(uint64_t seed, uint64_t offset, int64_t n, NoiseKind kind, void* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const philox::Block blk = philox::stream_block(seed, offset, static_cast<uint64_t>(i));
    if (kind == NoiseKind::kUniform) static_cast<double*>(out)[i] = philox::block_uniform(blk);
    else if (kind == NoiseKind::kGumbel) static_cast<float*>(out)[i] = philox::block_gumbel(blk);
    else static_cast<int64_t*>(out)[i] = static_cast<int64_t>(philox::block_uniform64(blk));
  }
}

}  // namespace

Status maskgit_step_cuda(const void* cond_logits, const void* uncond_logits, DType dtype, const int64_t* tokens,
                         const MaskGitParams& params, int64_t* new_tokens, int64_t* sampled, float* confidence,
                         int device, void* stream) {
  if (params.batch < 0 || params.seq_len < 0 || params.vocab <= 0)
    return Status::Invalid("maskgit_step: need B >= 0, N >= 0 and K > 0");
  if (params.mask_id >= 0 && params.mask_id < params.vocab)
    return Status::Invalid("maskgit_step: mask_id must lie outside the codebook [0, K)");
  if (dtype == DType::kFloat64) return Status::Invalid("maskgit_step: float64 logits are not supported");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  const int64_t rows = params.batch * params.seq_len;
  if (rows == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  const bool cached = params.vocab <= kMaxCachedVocab;
  const size_t smem = cached ? static_cast<size_t>(params.vocab) * sizeof(float) : 0;
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* c = static_cast<const T*>(cond_logits);
    const T* u = static_cast<const T*>(uncond_logits);
    if (cached)
      maskgit_rows_kernel<T, true><<<grid_for(rows), kThreads, smem, s>>>(c, u, tokens, params, sampled, confidence);
    else
      maskgit_rows_kernel<T, false><<<grid_for(rows), kThreads, 0, s>>>(c, u, tokens, params, sampled, confidence);
  });
  Status st = cuda::check_launch("maskgit_step row kernel");
  if (!st.ok()) return st;
  maskgit_select_kernel<<<grid_for(params.batch), kThreads, 0, s>>>(tokens, sampled, confidence, params, new_tokens);
  return cuda::check_launch("maskgit_step select kernel");
}

Status sample_next_token_cuda(const void* logits, DType dtype, const NextTokenParams& params, int64_t* out,
                              int device, void* stream) {
  if (params.batch < 0 || params.vocab <= 0) return Status::Invalid("sample_next_token: need B >= 0 and V > 0");
  if (dtype == DType::kFloat64) return Status::Invalid("sample_next_token: float64 logits are not supported");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (params.batch == 0) return Status::Ok();
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    next_token_kernel<T><<<grid_for(params.batch), kThreads, 0, s>>>(static_cast<const T*>(logits), params, out);
  });
  return cuda::check_launch("sample_next_token kernel");
}

Status philox_noise_cuda(uint64_t seed, uint64_t offset, int64_t n, NoiseKind kind, void* out, int device,
                         void* stream) {
  if (n < 0) return Status::Invalid("philox_noise: negative size");
  cuda::DeviceGuard guard(device);
  if (!guard.status().ok()) return guard.status();
  if (n == 0) return Status::Ok();
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  philox_noise_kernel<<<grid_for(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(seed, offset, n, kind,
                                                                                            out);
  return cuda::check_launch("philox_noise kernel");
}

}  // namespace sampling
}  // namespace unif2ace
