// Sampling kernels (docs/design.md §6): the fused MaskGIT step of masked discrete diffusion, a fused temperature /
// top-k / top-p next-token sampler, and the raw Philox noise both use (layout in unif2ace/philox.h).
//
// How a categorical draw is made (both samplers, CPU and CUDA alike). For a row z'[K] (logits after
// guidance and temperature) with maximum m:
//     e_k = exp(z'_k − m)                          repro::exp_nonpos, bit-identical on host and device
//     q_k = round(e_k · 2^30)                       an integer mass; q_argmax = 2^30, q_k = 0 below e ≈ 2^-31
//     Q   = Σ q_k                                   exact (uint64), so independent of summation order
//     u   = floor(R · Q / 2^64),  R = uniform64 of the row's Philox block
//     x̂   = the first k with q_0 + … + q_k > u      (inverse CDF; q_x̂ > 0 always)
// This reads each logit once, needs one exp per element and one random number per row, and gives the
// same token on every device and thread count. The law is softmax(z') up to the 2^-30 quantisation of
// each mass: total-variation distance at most K · 2^-31 / Σe (≤ 4e-6 at K = 8192), and tokens with
// p_k < 2^-31 · p_max are never drawn.
#pragma once

#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {
namespace sampling {

// One MaskGIT step over tokens[B, N] with logits [B, N, K] (docs/design.md §6). Host-side scalars precomputed by the
// caller so that the CPU and CUDA kernels see the same fp32 values:
struct MaskGitParams {
  int64_t batch = 0;          // B
  int64_t seq_len = 0;        // N
  int64_t vocab = 0;          // K
  int64_t mask_id = 0;        // outside [0, K)
  float guidance_scale = 0;   // g; used only when uncond logits are given
  float inv_temperature = 1;  // 1 / T (as fp32)
  float noise_scale = 0;      // τ · (1 − r): scale of the confidence Gumbel
  int64_t n_base = 0;         // floor(N · γ(r))
  bool last_step = false;     // n = 0 at the last step
  uint64_t seed = 0;
  uint64_t offset = 0;
};

// Per position i = b·N + n (Philox block i of (seed, offset)):
//   z        = z_c + g·(z_c − z_u)  (fmaf; z_c alone when uncond is null), z' = z · inv_temperature
//   sampled  = the inverse-CDF draw above when tokens[i] == mask_id, tokens[i] otherwise
//   conf     = (z'_x̂ − m − log(Q · 2^-30)) + noise_scale · gumbel(i)  for masked positions, +inf for known ones
// Per sequence b:
//   M        = #{n : tokens[b, n] == mask_id}
//   n_remask = 0 if last_step or M == 0, else max(1, min(M − 1, n_base))
//   new_tokens[b, n] = mask_id for the n_remask positions with the lowest (conf, n) — ties go to the lower
//   position — and sampled[b, n] elsewhere.
// `confidence` [B·N] fp32 is an output too (useful for tests); it may be any caller-provided buffer.
//
// Bad values on the CPU: a token neither in [0, K) nor mask_id, or a masked row whose z' has a NaN or +inf
// entry or is all −inf, returns kInvalidArgument naming the first such position (−inf entries are allowed
// and mean probability 0). The CUDA kernels cannot report without a host synchronisation; there a token out
// of range is treated as masked (it is resampled), and a bad row draws token 0 with confidence −inf (so it is
// re-masked first whenever a step re-masks anything). Token ids written are always in [0, K) or mask_id.
Status maskgit_step_cpu(const void* cond_logits, const void* uncond_logits, DType dtype, const int64_t* tokens,
                        const MaskGitParams& params, int64_t* new_tokens, int64_t* sampled, float* confidence);
Status maskgit_step_cuda(const void* cond_logits, const void* uncond_logits, DType dtype, const int64_t* tokens,
                         const MaskGitParams& params, int64_t* new_tokens, int64_t* sampled, float* confidence,
                         int device, void* stream);

// Next-token sampling from logits [B, V]: z' = z · inv_temperature; keep the top_k largest z' (top_k <= 0 or
// >= V: all), then within them the smallest set of largest z' whose probability mass reaches top_p of the
// kept mass (top_p >= 1: all); ties at either threshold are all kept. Draw by the inverse CDF above over the
// kept tokens with Philox block b of (seed, offset). greedy (temperature 0 or top_k == 1): the first argmax.
// Errors as maskgit_step: NaN / +inf / all −inf rows are an error on the CPU and draw token 0 on CUDA.
struct NextTokenParams {
  int64_t batch = 0;
  int64_t vocab = 0;
  float inv_temperature = 1;
  bool greedy = false;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  uint64_t offset = 0;
};
Status sample_next_token_cpu(const void* logits, DType dtype, const NextTokenParams& params, int64_t* out);
Status sample_next_token_cuda(const void* logits, DType dtype, const NextTokenParams& params, int64_t* out,
                              int device, void* stream);

// Raw noise of the stream for indices 0 .. n−1: kind 0 = uniform (float64 in [0, 1)), 1 = gumbel (fp32),
// 2 = uniform64 (the raw 64-bit integer, stored as int64 bits).
enum class NoiseKind : int32_t { kUniform = 0, kGumbel = 1, kUniform64 = 2 };
Status philox_noise_cpu(uint64_t seed, uint64_t offset, int64_t n, NoiseKind kind, void* out);
Status philox_noise_cuda(uint64_t seed, uint64_t offset, int64_t n, NoiseKind kind, void* out, int device,
                         void* stream);

}  // namespace sampling
}  // namespace unif2ace
