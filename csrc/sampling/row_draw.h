// Pieces shared by the CPU and CUDA sampling kernels: the integer mass of a probability (see sampling.h),
// the order-preserving integer key of a float, and the per-sequence re-mask count.
#pragma once

#include <cmath>
#include <cstdint>

#include "unif2ace/common.h"
#include "unif2ace/philox.h"
#include "unif2ace/sampling.h"

namespace unif2ace {
namespace sampling {
namespace detail {

constexpr float kMassScale = 1073741824.0f;        // 2^30
constexpr float kInvMassScale = 9.3132257461547852e-10f;  // 2^-30

// round-half-even(e · 2^30) for e in [0, 1] (e · 2^30 is exact; rintf rounds in the default mode on both
// sides and compiles to a vector round on the host).
U2A_HD uint32_t mass_of(float e) { return static_cast<uint32_t>(static_cast<int32_t>(rintf(e * kMassScale))); }

// log of the normaliser Σ e_k = Q · 2^-30 (Q >= 2^30 whenever the row has a finite maximum).
U2A_HD float log_norm(uint64_t q_total) {
  return repro::log_pos(static_cast<float>(q_total) * kInvMassScale);
}

// An unsigned key with the order of the float (for non-NaN values; -0 sorts just below +0).
U2A_HD uint32_t ordered_key(float f) {
  const uint32_t b = float_to_bits(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The number of positions to re-mask in a sequence with `masked` masked tokens (docs/design.md §6).
U2A_HD int64_t remask_count(const MaskGitParams& p, int64_t masked) {
  if (p.last_step || masked <= 0) return 0;
  int64_t n = p.n_base < masked - 1 ? p.n_base : masked - 1;
  return n < 1 ? 1 : n;
}

}  // namespace detail
}  // namespace sampling
}  // namespace unif2ace
