// Vectorisable fp32 math for the CPU kernels. glibc's expf does not vectorise without -ffast-math, which the
// core avoids (it changes NaN/inf semantics), so exp is computed here: Cody-Waite range reduction and a
// degree-6 polynomial, accurate to about 2 ulp over the fp32 range, with exact 0 / inf at the ends. Its range
// selects become vector blends only under -fno-trapping-math (set for the core in CMakeLists.txt); without it the
// loops that call it compile to scalar code.
#pragma once

#include <cmath>
#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {
namespace cpu {

#if defined(__GNUC__)
#pragma omp declare simd notinbranch
#endif
inline float fast_exp(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 in [-ln2/2, ln2/2].
  const float clamped = x < -104.0f ? -104.0f : (x > 88.7f ? 88.7f : x);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  float r = clamped - n * 0.693359375f;  // ln2 split in a high part exact in fp32 ...
  r = r - n * -2.12194440e-4f;           // ... and the low remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n in two steps so that n down to -150 stays representable through subnormals.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni / 2;
  const float s1 = bits_to_float(static_cast<uint32_t>(half + 127) << 23);
  const float s2 = bits_to_float(static_cast<uint32_t>(ni - half + 127) << 23);
  float out = p * s1 * s2;
  out = x < -104.0f ? 0.0f : out;
  out = x > 88.7f ? INFINITY : out;
  return out;
}

// Exponential in the accumulation type: the vectorised fp32 version, or libm for fp64.
inline float exp_acc(float x) { return fast_exp(x); }
inline double exp_acc(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace unif2ace
