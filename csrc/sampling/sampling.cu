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

// ---- MaskGIT rows, register path (K <= 16384): a row's logits live in registers, read once ----
//
// A row of K logits is split over kRowThreads threads (one warp per row up to K = 1024, then 4, 8 or 16 warps up
// to 4096, 8192, 16384), each holding kItems = 32 consecutive guided, tempered values in registers. The logits are
// read once, with 16-byte loads (8 bf16/fp16 or 4 fp32 per load) when the rows are 16-byte aligned, and enough
// rows are in flight to cover the memory latency (one row per block of 128-512 threads, or four rows per block at
// one warp each; at most 128 registers per thread, so 16 warps per SM). Then, without touching memory again: the
// row maximum, each thread's integer masses summed per group of 8 values, an exclusive scan of the thread sums
// (thread order = index order) to locate the thread whose range holds u, and in that thread the group, then the
// value. The arithmetic per value is the CPU kernel's (see mass_fast), so the token and confidence are
// bit-identical to it.
constexpr int kItems = 32;
constexpr int kGroup = 8;
constexpr int kGroups = kItems / kGroup;
constexpr int64_t kMaxRegisterVocab = 512 * kItems;

template <int kRowThreads>
struct RowShape {
  static constexpr int kBlock = kRowThreads < 128 ? 128 : kRowThreads;
  static constexpr int kRowsPerBlock = kBlock / kRowThreads;
  static constexpr int kWarpsPerRow = kRowThreads / 32;
};

// 16 bytes of T as floats (exact conversions).
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  static constexpr int n = 4;
  static __device__ __forceinline__ void load(const float* p, float* out) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  }
};
template <>
struct Vec16<bf16_t> {
  static constexpr int n = 8;
  static __device__ __forceinline__ void load(const bf16_t* p, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) out[2 * q] = bits_to_float(w[q] << 16), out[2 * q + 1] = bits_to_float(w[q] & 0xffff0000u);
  }
};
template <>
struct Vec16<f16_t> {
  static constexpr int n = 8;
  static __device__ __forceinline__ void load(const f16_t* p, float* out) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      out[2 * q] = to_float(f16_t{static_cast<uint16_t>(w[q] & 0xffffu)});
      out[2 * q + 1] = to_float(f16_t{static_cast<uint16_t>(w[q] >> 16)});
    }
  }
};

// mass_at with fewer instructions, bit-identical to it (the kernel is bound by instruction issue as much as by
// memory): repro::exp_nonpos gets its power of two from the bits of t = 1.5·2^23 + n (t lies in [2^23, 2^24), so
// bits(t) = 0x4B400000 + n exactly) instead of a float-to-int conversion, and folds the 2^30 of the mass into it
// (p·2^n·2^30 is exact either way: a normal number times powers of two); rint-then-convert becomes one rounding
// conversion (__float2int_rn: to nearest, ties to even, like rintf). Conversions issue at a quarter of the rate of
// FMAs or less, so this saves two of three per value.
__device__ __forceinline__ uint32_t mass_fast(float z, float m) {
  const float xc = fmaxf(__fsub_rn(z, m), -32.0f);  // z <= m, never NaN here: as `x < -32 ? -32 : x`
  const float t = fmaf(xc, 1.44269504088896341f, 12582912.0f);
  const float n = __fsub_rn(t, 12582912.0f);
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float q = 1.9875691500e-4f;
  q = fmaf(q, r, 1.3981999507e-3f);
  q = fmaf(q, r, 8.3334519073e-3f);
  q = fmaf(q, r, 4.1665795894e-2f);
  q = fmaf(q, r, 1.6666665459e-1f);
  q = fmaf(q, r, 5.0000001201e-1f);
  q = fmaf(q, __fmul_rn(r, r), r);
  q = __fadd_rn(q, 1.0f);
  const float scale30 = bits_to_float((float_to_bits(t) - 0x4B400000u + 127u + 30u) << 23);  // 2^(n + 30)
  return static_cast<uint32_t>(__float2int_rn(__fmul_rn(q, scale30)));
}

// max that propagates NaN (PTX max.NaN, sm_80+): one instruction per value finds the maximum and flags NaN; a row
// is bad (NaN, +inf or all -inf) exactly when this maximum is NaN, +inf or -inf.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

__device__ __forceinline__ float warp_max_nan(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float guide(float c, float u, bool guided, float g, float inv_t) {
  return guided ? __fmul_rn(fmaf(g, __fsub_rn(c, u), c), inv_t) : __fmul_rn(c, inv_t);
}

template <typename T, int kRowThreads, bool kVector>
__global__ void __launch_bounds__(RowShape<kRowThreads>::kBlock, 4 * 128 / RowShape<kRowThreads>::kBlock)
    maskgit_rows_kernel(const T* cond, const T* uncond, const int64_t* tokens, MaskGitParams p, int64_t* sampled,
                        float* confidence) {
  using Shape = RowShape<kRowThreads>;
  constexpr int kVec = kVector ? Vec16<T>::n : 1;
  constexpr int kRowWarps = Shape::kWarpsPerRow;
  __shared__ float s_max[kRowWarps];
  __shared__ uint64_t s_sum[kRowWarps];
  __shared__ uint64_t s_r64;
  const int t = threadIdx.x % kRowThreads;  // this thread's place in its row
  const int lane = threadIdx.x & 31, warp = t >> 5;
  const int64_t rows = p.batch * p.seq_len, K = p.vocab;
  const int64_t begin = static_cast<int64_t>(t) * kItems;
  const bool guided = uncond != nullptr;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * Shape::kRowsPerBlock; base < rows;
       base += static_cast<int64_t>(gridDim.x) * Shape::kRowsPerBlock) {
    const int64_t i = base + threadIdx.x / kRowThreads;
    if (i >= rows) continue;  // only in a warp-per-row block (one warp = one row), so uniform where it matters
    const int64_t tok = tokens[i];
    if (tok >= 0 && tok < K) {  // known (anything else, mask_id or out of range, is resampled)
      if (t == 0) sampled[i] = tok, confidence[i] = INFINITY;
      continue;  // uniform over the row
    }
    const T* crow = cond + i * K;
    const T* urow = guided ? uncond + i * K : nullptr;

    // 1. Load (each logit once), guide and temper; the maximum (NaN if any value is NaN).
    float z[kItems];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < kItems; j += kVec) {
      const int64_t k = begin + j;
      if (k < K) {  // with kVector, K % kVec == 0: the whole vector is in range
        float c[kVec], u[kVec];
        if constexpr (kVector) {
          Vec16<T>::load(crow + k, c);
          if (guided) Vec16<T>::load(urow + k, u);
        } else {
          c[0] = cuda::load_float(crow + k);
          if (guided) u[0] = cuda::load_float(urow + k);
        }
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          const float zv = guide(c[v], guided ? u[v] : 0.0f, guided, p.guidance_scale, p.inv_temperature);
          z[j + v] = zv;
          m = max_nan(m, zv);
        }
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) z[j + v] = -INFINITY;  // mass 0, never drawn
      }
    }
    m = warp_max_nan(m);
    if constexpr (kRowWarps > 1) {
      if (lane == 0) s_max[warp] = m;
      __syncthreads();
      m = s_max[0];
#pragma unroll
      for (int w = 1; w < kRowWarps; ++w) m = max_nan(m, s_max[w]);
    }
    if (!(m > -INFINITY && m < INFINITY)) {  // NaN, +inf, or nothing but -inf
      if (t == 0) sampled[i] = 0, confidence[i] = -INFINITY;
      if constexpr (kRowWarps > 1) __syncthreads();  // s_max is rewritten by the next row
      continue;
    }

    // 2. Integer masses: per group of 8 values and per thread (exact sums).
    uint64_t group_sum[kGroups];
    uint64_t local = 0;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      uint64_t gs = 0;
#pragma unroll
      for (int v = 0; v < kGroup; ++v) gs += mass_fast(z[gi * kGroup + v], m);
      group_sum[gi] = gs;
      local += gs;
    }

    // 3. Exclusive scan of the thread sums over the row; the row total; the row's uniform64.
    uint64_t incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    uint64_t excl = incl - local, total = __shfl_sync(0xffffffffu, incl, 31);
    uint64_t r64;
    if constexpr (kRowWarps > 1) {
      if (lane == 31) s_sum[warp] = incl;
      if (t == 0) s_r64 = philox::block_uniform64(philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i)));
      __syncthreads();
      uint64_t before = 0;
      total = 0;
#pragma unroll
      for (int w = 0; w < kRowWarps; ++w) {
        before += w < warp ? s_sum[w] : 0;
        total += s_sum[w];
      }
      excl += before;
      r64 = s_r64;
      __syncthreads();  // the shared values are rewritten by the next row
    } else {
      uint64_t mine = 0;
      if (lane == 0) mine = philox::block_uniform64(philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i)));
      r64 = __shfl_sync(0xffffffffu, mine, 0);
    }
    const uint64_t target = philox::mulhi64(r64, total);

    // 4. The thread whose range holds the target finds the group, then the value: the first index whose
    //    running mass exceeds it.
    if (local > 0 && excl <= target && target < excl + local) {
      uint64_t run = excl;
      int found = -1;
      float zx = 0.0f;
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        if (found < 0 && run + group_sum[gi] > target) {
#pragma unroll
          for (int v = 0; v < kGroup; ++v) {
            run += mass_fast(z[gi * kGroup + v], m);
            if (found < 0 && run > target) found = gi * kGroup + v, zx = z[gi * kGroup + v];
          }
        } else if (found < 0) {
          run += group_sum[gi];
        }
      }
      const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i));
      const float logp = __fsub_rn(__fsub_rn(zx, m), detail::log_norm(total));
      sampled[i] = begin + found;
      confidence[i] = fmaf(p.noise_scale, philox::block_gumbel(blk), logp);
    }
  }
}

// ---- MaskGIT rows, generic path (any K): one block per row, values re-read from global memory / L2 ----
template <typename T>
__global__ void maskgit_rows_generic_kernel(const T* cond, const T* uncond, const int64_t* tokens, MaskGitParams p,
                                            int64_t* sampled, float* confidence) {
  __shared__ float fscratch[32];
  __shared__ uint64_t uscratch[32];
  const int64_t rows = p.batch * p.seq_len, K = p.vocab;
  for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
    const int64_t tok = tokens[i];
    if (tok >= 0 && tok < K) {
      if (threadIdx.x == 0) sampled[i] = tok, confidence[i] = INFINITY;
      continue;
    }
    const T* crow = cond + i * K;
    const T* urow = uncond ? uncond + i * K : nullptr;
    auto value = [&](int64_t k) { return tempered(crow, urow, k, p.guidance_scale, p.inv_temperature); };
    float m = -INFINITY;
    int bad = 0;
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
      const float z = value(k);
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
    const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i));
    uint64_t total = 0;
    const int64_t x = draw_row(K, m, philox::block_uniform64(blk), value, [](int64_t) { return true; }, uscratch,
                               &total);
    if (x >= 0) {
      const float logp = __fsub_rn(__fsub_rn(value(x), m), detail::log_norm(total));
      sampled[i] = x;
      confidence[i] = fmaf(p.noise_scale, philox::block_gumbel(blk), logp);
    }
    __syncthreads();  // the scratch is reused by the next row
  }
}

// ---- MaskGIT selection: one block per sequence, radix select of the n lowest (confidence, position) ----
// Four passes of 8-bit digits over the confidences (L1/L2-resident: N·4 bytes per sequence); each pass builds a
// 256-bin histogram with shared-memory integer atomics and finds the digit holding the rank with a parallel
// scan over the bins (one bin per thread). A last pass writes the tokens: positions whose key is below the
// threshold key are re-masked, and of those equal to it the lowest positions first (a scan of the equal counts
// in position order), so the result does not depend on the atomics' order.
constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / 32;

// Exclusive prefix over the block's threads (thread order) of v; *total gets the block sum.
__device__ __forceinline__ int64_t select_block_scan(int64_t v, int64_t* scratch, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t n = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += n;
  }
  __syncthreads();  // scratch may still be read by a previous scan
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  int64_t before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kSelectWarps; ++w) {
    before += w < warp ? scratch[w] : 0;
    sum += scratch[w];
  }
  *total = sum;
  return before + incl - v;
}

__global__ void __launch_bounds__(kSelectThreads)
    maskgit_select_kernel(const int64_t* tokens, const int64_t* sampled, const float* confidence, MaskGitParams p,
                          int64_t* new_tokens) {
  __shared__ int hist[256];
  __shared__ int64_t scan_scratch[kSelectWarps];
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_need;
  const int64_t N = p.seq_len, K = p.vocab;
  for (int64_t b = blockIdx.x; b < p.batch; b += gridDim.x) {
    const int64_t* tok = tokens + b * N;
    const float* conf = confidence + b * N;
    const int64_t* drawn = sampled + b * N;
    int64_t* out = new_tokens + b * N;
    int64_t masked_here = 0, masked = 0;
    for (int64_t n = threadIdx.x; n < N; n += kSelectThreads) masked_here += tok[n] < 0 || tok[n] >= K;
    select_block_scan(masked_here, scan_scratch, &masked);
    const int64_t count = detail::remask_count(p, masked);
    if (count == 0) {
      for (int64_t n = threadIdx.x; n < N; n += kSelectThreads) out[n] = drawn[n];
      continue;  // uniform across the block
    }
    // The key of rank count-1 (0-based, ascending), digit by digit from the top.
    if (threadIdx.x == 0) s_prefix = 0, s_need = count - 1;
    uint32_t mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[threadIdx.x] = 0;
      __syncthreads();  // also publishes s_prefix / s_need of the previous digit
      const uint32_t prefix = s_prefix;
      const int64_t need = s_need;
      for (int64_t n = threadIdx.x; n < N; n += kSelectThreads) {
        const uint32_t key = detail::ordered_key(conf[n]);
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xffu], 1);
      }
      __syncthreads();
      const int64_t in_bin = hist[threadIdx.x];
      int64_t unused = 0;
      const int64_t before = select_block_scan(in_bin, scan_scratch, &unused);
      if (before <= need && need < before + in_bin) {  // exactly one bin holds the rank
        s_need = need - before;
        s_prefix = prefix | (static_cast<uint32_t>(threadIdx.x) << shift);
      }
      mask |= 0xffu << shift;
      __syncthreads();
    }
    const uint32_t threshold = s_prefix;
    const int64_t equal_quota = s_need + 1;  // positions with key == threshold to re-mask, lowest first
    // Positions in contiguous chunks per thread, so that a scan over threads is a scan in position order.
    const int64_t chunk = (N + kSelectThreads - 1) / kSelectThreads;
    const int64_t lo = threadIdx.x * chunk, hi = lo + chunk < N ? lo + chunk : N;
    int64_t equal_here = 0;
    for (int64_t n = lo; n < hi; ++n) equal_here += detail::ordered_key(conf[n]) == threshold;
    int64_t unused = 0;
    int64_t rank = select_block_scan(equal_here, scan_scratch, &unused);
    for (int64_t n = lo; n < hi; ++n) {
      const uint32_t key = detail::ordered_key(conf[n]);
      bool remask = key < threshold;
      if (key == threshold) remask = rank++ < equal_quota;
      out[n] = remask ? p.mask_id : drawn[n];
    }
    __syncthreads();  // s_prefix / s_need are reset for the next sequence
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

template <typename T, int kRowThreads>
void launch_maskgit_rows(const T* c, const T* u, bool vector, const int64_t* tokens, const MaskGitParams& params,
                         int64_t* sampled, float* confidence, cudaStream_t s) {
  using Shape = RowShape<kRowThreads>;
  const int64_t rows = params.batch * params.seq_len;
  const int64_t blocks = (rows + Shape::kRowsPerBlock - 1) / Shape::kRowsPerBlock;
  const int grid = static_cast<int>(blocks < (1 << 30) ? blocks : (1 << 30));
  if (vector)
    maskgit_rows_kernel<T, kRowThreads, true><<<grid, Shape::kBlock, 0, s>>>(c, u, tokens, params, sampled, confidence);
  else
    maskgit_rows_kernel<T, kRowThreads, false><<<grid, Shape::kBlock, 0, s>>>(c, u, tokens, params, sampled,
                                                                             confidence);
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

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
  const int64_t K = params.vocab;
  dispatch_half_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* c = static_cast<const T*>(cond_logits);
    const T* u = static_cast<const T*>(uncond_logits);
    // 16-byte loads need every row to start on a 16-byte boundary.
    const bool vector = K % Vec16<T>::n == 0 && aligned16(c) && aligned16(u);
    if (K <= 32 * kItems)
      launch_maskgit_rows<T, 32>(c, u, vector, tokens, params, sampled, confidence, s);
    else if (K <= 128 * kItems)
      launch_maskgit_rows<T, 128>(c, u, vector, tokens, params, sampled, confidence, s);
    else if (K <= 256 * kItems)
      launch_maskgit_rows<T, 256>(c, u, vector, tokens, params, sampled, confidence, s);
    else if (K <= kMaxRegisterVocab)
      launch_maskgit_rows<T, 512>(c, u, vector, tokens, params, sampled, confidence, s);
    else
      maskgit_rows_generic_kernel<T><<<grid_for(rows), kThreads, 0, s>>>(c, u, tokens, params, sampled, confidence);
  });
  Status st = cuda::check_launch("maskgit_step row kernel");
  if (!st.ok()) return st;
  maskgit_select_kernel<<<grid_for(params.batch), kSelectThreads, 0, s>>>(tokens, sampled, confidence, params,
                                                                         new_tokens);
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
