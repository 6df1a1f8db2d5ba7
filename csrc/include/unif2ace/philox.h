// Counter-based random numbers (Philox 4x32-10) and the bit-reproducible float math that turns them into
// noise, shared by the CPU and CUDA kernels (docs/design.md §3). Everything here is __host__ __device__ and gives the
// same bits on both sides: every multiply-add is written as an explicit fmaf (so neither gcc's nor nvcc's
// contraction rules matter) and no libm call is involved.
//
// Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11): a 128-bit counter
// (c0, c1, c2, c3) and a 64-bit key (k0, k1); ten rounds of
//     (c0, c1, c2, c3) <- (hi(M1*c2) ^ c1 ^ k0,  lo(M1*c2),  hi(M0*c0) ^ c3 ^ k1,  lo(M0*c0))
// with M0 = 0xD2511F53, M1 = 0xCD9E8D57, the key bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85)
// between rounds.
//
// The unif2ace noise stream (one Philox block per "draw site", e.g. per row of logits):
//     key     = (seed & 0xffffffff, seed >> 32)
//     counter = (index & 0xffffffff, index >> 32, offset & 0xffffffff, offset >> 32)
// and from the block's four 32-bit outputs (x0, x1, x2, x3):
//     uniform64(index) = (x1 << 32) | x0                 a 64-bit uniform integer (categorical draws)
//     uniform(index)   = (x1 << 32 | x0) >> 11 · 2^-53   the same draw as a float64 in [0, 1)
//     gumbel(index)    = −log(−log(u)),  u = ((x2 >> 9) + 0.5) · 2^-23 ∈ (0, 1), exact in fp32
// x3 is unused. The result depends only on (seed, offset, index): never on threads or launch shape.
#pragma once

#include <cmath>
#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

struct Block {
  uint32_t x[4];
};

U2A_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// floor(a * b / 2^64): maps a 64-bit uniform integer a onto [0, b) without modulo bias beyond 2^-64 · b.
U2A_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// Philox 4x32 with `rounds` rounds (10 for the standard generator) on a raw counter and key.
U2A_HD Block philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                        int rounds = 10) {
  for (int i = 0; i < rounds; ++i) {
    if (i > 0) {
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    const uint32_t lo0 = kMul0 * c0, hi0 = mulhi32(kMul0, c0);
    const uint32_t lo1 = kMul1 * c2, hi1 = mulhi32(kMul1, c2);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Block{{c0, c1, c2, c3}};
}

// The block of the unif2ace noise stream for draw site `index` (layout in the file comment).
U2A_HD Block stream_block(uint64_t seed, uint64_t offset, uint64_t index) {
  return philox4x32(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), static_cast<uint32_t>(offset),
                    static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed),
                    static_cast<uint32_t>(seed >> 32));
}

U2A_HD uint64_t block_uniform64(const Block& b) { return (static_cast<uint64_t>(b.x[1]) << 32) | b.x[0]; }

U2A_HD double block_uniform(const Block& b) {
  return static_cast<double>(block_uniform64(b) >> 11) * (1.0 / 9007199254740992.0);  // 2^-53
}

// A uniform in (0, 1) from the top 23 bits: (2j + 1) · 2^-24 is exact in fp32 and never 0 or 1, so
// −log(−log u) is finite.
U2A_HD float u_open(uint32_t bits) { return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-7f; }

}  // namespace philox

namespace repro {

// log(x) for finite x > 0 (normal or subnormal), about 1 ulp, bit-identical on host and device. Cody-Waite
// style: x = 2^e · m with m in [√½, √2), log(1 + f) by a degree-9 polynomial in f = m − 1 (Cephes' logf
// coefficients), e · ln2 added in two parts. x <= 0 gives -inf, +inf gives +inf, NaN gives NaN.
U2A_HD float log_pos(float x) {
  if (!(x > 0.0f)) return x == 0.0f ? -INFINITY : NAN;
  if (x == INFINITY) return x;
  uint32_t bits = float_to_bits(x);
  int32_t e = 0;
  if (bits < 0x00800000u) {  // subnormal: scale into the normal range first
    x = x * 16777216.0f;     // 2^24, exact
    bits = float_to_bits(x);
    e = -24;
  }
  e += static_cast<int32_t>(bits >> 23) - 126;                             // x = 2^e · m, m in [0.5, 1)
  float m = bits_to_float((bits & 0x007fffffu) | 0x3f000000u);
  if (m < 0.70710678118654752f) {
    e -= 1;
    m = m + m;  // now in [√½, 1.414...)
  }
  const float f = m - 1.0f;  // exact (Sterbenz)
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  const float fz = f * z;
  const float ef = static_cast<float>(e);
  float y = fmaf(p, fz, ef * -2.12194440e-4f);  // f^3 · P(f) + e · ln2_lo
  y = fmaf(-0.5f, z, y);
  const float head = fmaf(ef, 0.693359375f, f);  // e · ln2_hi is exact in fp32
  return head + y;
}

// exp(x) for x <= 0, about 2 ulp on [-32, 0]; x below -32 (and -inf) is clamped to -32 (e^-32 ≈ 1.3e-14: the
// sampling kernels only need e^(z - max) down to the 2^-31 quantisation of their integer masses, where both
// round to 0). Bit-identical on host and device and branch-free, so it vectorises on the host (no libm).
// Cephes' expf polynomial, written with explicit fmaf.
U2A_HD float exp_nonpos(float x) {
  const float xc = x < -32.0f ? -32.0f : x;
  // n = round(x / ln2) by the 1.5·2^23 trick (x / ln2 is within [-47, 0], so this is exact rounding).
  const float t = fmaf(xc, 1.44269504088896341f, 12582912.0f);
  const float n = t - 12582912.0f;
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  const float r2 = r * r;
  p = fmaf(p, r2, r);
  p = p + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return p * scale;
}

// The Gumbel(0, 1) draw of a noise block: −log(−log(u(x2))).
U2A_HD float gumbel_from_bits(uint32_t bits) { return -log_pos(-log_pos(philox::u_open(bits))); }

}  // namespace repro

namespace philox {
U2A_HD float block_gumbel(const Block& b) { return repro::gumbel_from_bits(b.x[2]); }
}  // namespace philox

}  // namespace unif2ace
