// CPU sampling kernels: the fused MaskGIT step, next-token sampling and raw Philox noise.
//
// Every row is one OpenMP iteration with its own Philox block, so results depend neither on the thread count
// nor on the schedule. A row's logits are read once into a per-thread fp32 buffer (guidance and temperature
// applied on the way, with the maximum); everything after that runs on the buffer in L1/L2: one vectorised
// pass computes the integer masses and their exact sum, and a short search finds the drawn token.
// The per-thread buffers are allocated before each parallel region (cpu_scratch.h), so a failed allocation
// becomes Status::kOutOfMemory instead of terminating the process.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "row_draw.h"
#include "unif2ace/cpu_scratch.h"
#include "unif2ace/philox.h"
#include "unif2ace/sampling.h"

namespace unif2ace {
namespace sampling {
namespace {

using detail::mass_of;

// 1 when z is NaN or +inf (an integer test on the bits, so the loops below vectorise).
inline uint32_t nan_or_pos_inf(float z) {
  const uint32_t b = float_to_bits(z);
  return static_cast<uint32_t>(((b & 0x7fffffffu) > 0x7f800000u) | (b == 0x7f800000u));
}

// Loads a row (guided if `uncond` is non-null) scaled by inv_t into buf; returns the max and flags NaN / +inf.
template <typename T>
float load_row(const T* cond, const T* uncond, float g, float inv_t, int64_t k_count, float* buf, int* bad) {
  float m = -INFINITY;
  uint32_t nonfinite = 0;
  if (uncond != nullptr) {
#pragma omp simd reduction(max : m) reduction(| : nonfinite)
    for (int64_t k = 0; k < k_count; ++k) {
      const float c = widen(cond[k]);
      const float d = c - widen(uncond[k]);
      const float z = fmaf(g, d, c) * inv_t;
      buf[k] = z;
      m = m > z ? m : z;
      nonfinite |= nan_or_pos_inf(z);
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : nonfinite)
    for (int64_t k = 0; k < k_count; ++k) {
      const float z = widen(cond[k]) * inv_t;
      buf[k] = z;
      m = m > z ? m : z;
      nonfinite |= nan_or_pos_inf(z);
    }
  }
  *bad = nonfinite != 0 || !(m > -INFINITY);
  return m;
}

// fp16 rows: converted to fp32 first (F16C when the CPU has it: exact, like the scalar conversion, and much
// faster than the bit-twiddling one, which does not vectorise), then loaded as fp32.
void f16_row_to_float(const f16_t* src, int64_t n, float* dst) {
  int64_t k = 0;
#if defined(__F16C__)
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
#endif
  for (; k < n; ++k) dst[k] = to_float(src[k]);
}

// load_row for any storage type; `tmp` holds K floats when T is fp16 and the row is guided.
template <typename T>
float load_any_row(const T* cond, const T* uncond, float g, float inv_t, int64_t k_count, float* buf, float* tmp,
                   int* bad) {
  if constexpr (std::is_same_v<T, f16_t>) {
    f16_row_to_float(cond, k_count, buf);
    if (uncond != nullptr) f16_row_to_float(uncond, k_count, tmp);
    return load_row<float>(buf, uncond ? tmp : nullptr, g, inv_t, k_count, buf, bad);
  } else {
    (void)tmp;
    return load_row(cond, uncond, g, inv_t, k_count, buf, bad);
  }
}

// Integer masses q_k of buf (optionally only where key_k >= min_key) into q; returns their exact sum.
uint64_t masses(const float* buf, int64_t k_count, float m, uint32_t* q) {
  uint64_t total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t k = 0; k < k_count; ++k) {
    const uint32_t v = mass_of(repro::exp_nonpos(buf[k] - m));
    q[k] = v;
    total += v;
  }
  return total;
}

// The first k with q_0 + ... + q_k > u (u < Σ q).
int64_t find_prefix(const uint32_t* q, int64_t k_count, uint64_t u) {
  constexpr int64_t kChunk = 256;
  uint64_t run = 0;
  int64_t k = 0;
  for (; k + kChunk <= k_count; k += kChunk) {
    uint64_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < kChunk; ++j) s += q[k + j];
    if (run + s > u) break;
    run += s;
  }
  for (; k < k_count; ++k) {
    run += q[k];
    if (run > u) return k;
  }
  return k_count - 1;  // unreachable when u < Σ q
}

std::string position(int64_t b, int64_t n) { return "[" + std::to_string(b) + ", " + std::to_string(n) + "]"; }

template <typename T>
Status maskgit_typed(const T* cond, const T* uncond, const int64_t* tokens, const MaskGitParams& p,
                     int64_t* new_tokens, int64_t* sampled, float* confidence) {
  const int64_t rows = p.batch * p.seq_len, K = p.vocab;
  // Token values first: cheap, and nothing is written when they are bad.
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = tokens[i];
    if (t != p.mask_id && (t < 0 || t >= K))
      return Status::Invalid("tokens" + position(i / p.seq_len, i % p.seq_len) + " = " + std::to_string(t) +
                             " is neither a codebook id in [0, " + std::to_string(K) + ") nor mask_id (" +
                             std::to_string(p.mask_id) + ")");
  }
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  const int team = cpu::team_size(rows);
  const cpu::ThreadScratch<float> bufs(team, K), tmps(team, std::is_same_v<T, f16_t> && uncond != nullptr ? K : 0);
  const cpu::ThreadScratch<uint32_t> qs(team, K);
#pragma omp parallel num_threads(team)
  {
    float* const buf = bufs.mine();
    float* const tmp = tmps.mine();
    uint32_t* const q = qs.mine();
#pragma omp for schedule(dynamic, 4)
    for (int64_t i = 0; i < rows; ++i) {
      if (tokens[i] != p.mask_id) {
        sampled[i] = tokens[i];
        confidence[i] = INFINITY;
        continue;
      }
      int bad = 0;
      const float m = load_any_row(cond + i * K, uncond ? uncond + i * K : nullptr, p.guidance_scale,
                                   p.inv_temperature, K, buf, tmp, &bad);
      const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(i));
      if (bad) {
        sampled[i] = 0;
        confidence[i] = -INFINITY;
#pragma omp critical(unif2ace_maskgit_bad)
        first_bad = std::min(first_bad, i);
        continue;
      }
      const uint64_t total = masses(buf, K, m, q);
      const int64_t x = find_prefix(q, K, philox::mulhi64(philox::block_uniform64(blk), total));
      const float logp = (buf[x] - m) - detail::log_norm(total);
      sampled[i] = x;
      confidence[i] = fmaf(p.noise_scale, philox::block_gumbel(blk), logp);
    }
  }
  if (first_bad != std::numeric_limits<int64_t>::max())
    return Status::Invalid("cond_logits" + std::string(uncond ? "/uncond_logits" : "") + " at position " +
                           position(first_bad / p.seq_len, first_bad % p.seq_len) +
                           ": the guided logits divided by the temperature contain NaN or +inf, or are all -inf");

  // Per sequence: the n lowest (confidence, position) keys are re-masked (selection, no sort).
  const int64_t N = p.seq_len;
  const int seq_team = cpu::team_size(p.batch);
  const cpu::ThreadScratch<uint64_t> key_scratch(seq_team, N);
#pragma omp parallel for schedule(static) num_threads(seq_team)
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t* tok = tokens + b * N;
    const float* conf = confidence + b * N;
    int64_t masked = 0;
    for (int64_t n = 0; n < N; ++n) masked += tok[n] == p.mask_id;
    const int64_t count = detail::remask_count(p, masked);
    for (int64_t n = 0; n < N; ++n) new_tokens[b * N + n] = sampled[b * N + n];
    if (count == 0) continue;
    uint64_t* const keys = key_scratch.mine();
    for (int64_t n = 0; n < N; ++n)
      keys[n] = (static_cast<uint64_t>(detail::ordered_key(conf[n])) << 32) | static_cast<uint64_t>(n);
    std::nth_element(keys, keys + (count - 1), keys + N);
    const uint64_t threshold = keys[count - 1];
    for (int64_t n = 0; n < N; ++n) {
      const uint64_t key = (static_cast<uint64_t>(detail::ordered_key(conf[n])) << 32) | static_cast<uint64_t>(n);
      if (key <= threshold) new_tokens[b * N + n] = p.mask_id;
    }
  }
  return Status::Ok();
}

// ---- next-token sampling ----

// The largest key t such that Σ_{key_k >= t} w_k >= need (w_k = 1 for counts, q_k for masses), restricted to
// keys >= floor_key. MSB-first radix select over the 32-bit keys: four passes of 256 bins.
template <bool Weighted>
uint32_t select_threshold(const uint32_t* keys, const uint32_t* q, int64_t k_count, uint32_t floor_key,
                          uint64_t need) {
  uint32_t prefix = 0, prefix_mask = 0;
  uint64_t hist[256];
  for (int shift = 24; shift >= 0; shift -= 8) {
    std::fill(hist, hist + 256, uint64_t{0});
    for (int64_t k = 0; k < k_count; ++k) {
      const uint32_t key = keys[k];
      if (key < floor_key || (key & prefix_mask) != prefix) continue;
      hist[(key >> shift) & 0xffu] += Weighted ? q[k] : 1u;
    }
    uint64_t acc = 0;
    int bin = 255;
    for (; bin > 0; --bin) {
      if (acc + hist[bin] >= need) break;
      acc += hist[bin];
    }
    need -= acc;
    prefix |= static_cast<uint32_t>(bin) << shift;
    prefix_mask |= 0xffu << shift;
  }
  return prefix;
}

template <typename T>
Status next_token_typed(const T* logits, const NextTokenParams& p, int64_t* out) {
  const int64_t V = p.vocab;
  const bool use_k = !p.greedy && p.top_k > 0 && p.top_k < V;
  const bool use_p = !p.greedy && p.top_p < 1.0;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  const int team = cpu::team_size(p.batch);
  const cpu::ThreadScratch<float> bufs(team, V);
  const cpu::ThreadScratch<uint32_t> qs(team, p.greedy ? 0 : V), key_scratch(team, use_k || use_p ? V : 0);
#pragma omp parallel num_threads(team)
  {
    float* const buf = bufs.mine();
    uint32_t* const q = qs.mine();
    uint32_t* const keys = key_scratch.mine();
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < p.batch; ++b) {
      int bad = 0;
      const float m = load_any_row(logits + b * V, static_cast<const T*>(nullptr), 0.0f,
                                   p.greedy ? 1.0f : p.inv_temperature, V, buf, nullptr, &bad);
      if (bad) {
        out[b] = 0;
#pragma omp critical(unif2ace_next_token_bad)
        first_bad = std::min(first_bad, b);
        continue;
      }
      if (p.greedy) {
        int64_t x = 0;
        while (buf[x] != m) ++x;
        out[b] = x;
        continue;
      }
      uint64_t total = masses(buf, V, m, q);
      if (use_k || use_p) {
        for (int64_t k = 0; k < V; ++k) keys[k] = detail::ordered_key(buf[k]);
        uint32_t t = 0;
        if (use_k) t = select_threshold<false>(keys, q, V, 0, static_cast<uint64_t>(p.top_k));
        if (use_p) {
          uint64_t kept = 0;
          for (int64_t k = 0; k < V; ++k) kept += keys[k] >= t ? q[k] : 0u;
          double need_d = std::ceil(p.top_p * static_cast<double>(kept));
          uint64_t need = need_d < 1.0 ? 1 : static_cast<uint64_t>(need_d);
          if (need > kept) need = kept;
          t = select_threshold<true>(keys, q, V, t, need);
        }
        total = 0;
        for (int64_t k = 0; k < V; ++k) {
          if (keys[k] < t) q[k] = 0;
          total += q[k];
        }
      }
      const philox::Block blk = philox::stream_block(p.seed, p.offset, static_cast<uint64_t>(b));
      out[b] = find_prefix(q, V, philox::mulhi64(philox::block_uniform64(blk), total));
    }
  }
  if (first_bad != std::numeric_limits<int64_t>::max())
    return Status::Invalid("logits[" + std::to_string(first_bad) +
                           "]: logits divided by the temperature contain NaN or +inf, or are all -inf");
  return Status::Ok();
}

}  // namespace

Status maskgit_step_cpu(const void* cond_logits, const void* uncond_logits, DType dtype, const int64_t* tokens,
                        const MaskGitParams& params, int64_t* new_tokens, int64_t* sampled, float* confidence) {
  if (params.batch < 0 || params.seq_len < 0 || params.vocab <= 0)
    return Status::Invalid("maskgit_step: need B >= 0, N >= 0 and K > 0");
  if (params.mask_id >= 0 && params.mask_id < params.vocab)
    return Status::Invalid("maskgit_step: mask_id must lie outside the codebook [0, K)");
  if (dtype == DType::kFloat64) return Status::Invalid("maskgit_step: float64 logits are not supported");
  return guarded("maskgit_step", [&] {
    return dispatch_half_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      return maskgit_typed(static_cast<const T*>(cond_logits), static_cast<const T*>(uncond_logits), tokens,
                           params, new_tokens, sampled, confidence);
    });
  });
}

Status sample_next_token_cpu(const void* logits, DType dtype, const NextTokenParams& params, int64_t* out) {
  if (params.batch < 0 || params.vocab <= 0) return Status::Invalid("sample_next_token: need B >= 0 and V > 0");
  if (dtype == DType::kFloat64) return Status::Invalid("sample_next_token: float64 logits are not supported");
  return guarded("sample_next_token", [&] {
    return dispatch_half_float(dtype, [&](auto tag) {
      using T = decltype(tag);
      return next_token_typed(static_cast<const T*>(logits), params, out);
    });
  });
}

Status philox_noise_cpu(uint64_t seed, uint64_t offset, int64_t n, NoiseKind kind, void* out) {
  if (n < 0) return Status::Invalid("philox_noise: negative size");
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const philox::Block blk = philox::stream_block(seed, offset, static_cast<uint64_t>(i));
    switch (kind) {
      case NoiseKind::kUniform: static_cast<double*>(out)[i] = philox::block_uniform(blk); break;
      case NoiseKind::kGumbel: static_cast<float*>(out)[i] = philox::block_gumbel(blk); break;
      case NoiseKind::kUniform64:
        static_cast<int64_t*>(out)[i] = static_cast<int64_t>(philox::block_uniform64(blk));
        break;
    }
  }
  return Status::Ok();
}

}  // namespace sampling
}  // namespace unif2ace
