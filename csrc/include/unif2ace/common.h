// Shared types of the unif2ace C++/CUDA core: dtypes, status, and bf16/fp16 <-> fp32 conversion usable on
// host and device. Torch-free by design: every kernel takes raw pointers, sizes and (for CUDA) a stream.
#pragma once

#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>

#if defined(__CUDACC__)
#define U2A_HD __host__ __device__ __forceinline__
#else
#define U2A_HD inline
#endif

namespace unif2ace {

// kFloat64 is supported by the CPU kernels (for float64 gradient checks); CUDA kernels take the other three.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
    case DType::kFloat64: return "float64";
  }
  return "unknown";
}

// The result of every entry point. Kernels never throw; callers turn a failed Status into their own error.
struct Status {
  enum Code : int32_t {
    kOk = 0, kInvalidArgument = 1, kCudaError = 2, kNotBuilt = 3, kOutOfMemory = 4, kInternal = 5
  };
  Code code = kOk;
  std::string message;

  static Status Ok() { return {}; }
  static Status Invalid(std::string m) { return {kInvalidArgument, std::move(m)}; }
  static Status Cuda(std::string m) { return {kCudaError, std::move(m)}; }
  bool ok() const { return code == kOk; }
};

// Runs the body of an entry point (a callable returning Status) and turns any exception that escapes it into
// a Status: std::bad_alloc (host scratch could not be allocated) into kOutOfMemory, anything else into
// kInternal. An exception must never leave an OpenMP region (that calls std::terminate), so kernels allocate
// their scratch before a region opens (unif2ace/cpu_scratch.h) and let it throw here.
template <typename Body>
Status guarded(const char* op, Body&& body) noexcept {
  Status failed;
  try {
    return body();
  } catch (const std::bad_alloc&) {
    failed.code = Status::kOutOfMemory;
  } catch (...) {
    failed.code = Status::kInternal;
  }
  try {  // the message needs memory too; without it the code alone still says what happened
    failed.message = std::string(op) + (failed.code == Status::kOutOfMemory
                                            ? ": out of memory (a host scratch buffer could not be allocated)"
                                            : ": internal error (an unexpected C++ exception)");
  } catch (...) {
  }
  return failed;
}

// ---- 16-bit float storage types (bit patterns; arithmetic always happens in fp32) ----
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

U2A_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

U2A_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

U2A_HD float to_float(float x) { return x; }
U2A_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

U2A_HD float to_float(f16_t x) {
  // Branch-free (selects only) so that loops over fp16 data vectorise.
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  const float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // mantissa * 2^-24, exact
  const uint32_t normal = (exponent == 0x1fu) ? (0x7f800000u | (mantissa << 13))  // inf / nan
                                              : (((exponent + 112u) << 23) | (mantissa << 13));
  return bits_to_float(sign | (exponent == 0 ? float_to_bits(subnormal) : normal));
}

// Round to nearest even, NaN stays NaN (quietened) -- the same bits torch produces.
U2A_HD bf16_t to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

U2A_HD f16_t to_f16(float f) {
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint16_t out;
  if (u >= 0x47800000u) {                       // |f| >= 65536, inf or nan
    out = (u > 0x7f800000u) ? 0x7e00u : 0x7c00u;
  } else if (u < 0x38800000u) {                 // below the smallest normal half: subnormal or zero
    // Adding 0.5 lets the FPU do the round-to-nearest-even at the subnormal half's precision.
    const float magic = bits_to_float(126u << 23);
    const uint32_t r = float_to_bits(bits_to_float(u) + magic);
    out = static_cast<uint16_t>(r - (126u << 23));
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += 0xc8000fffu + mantissa_odd;            // rebias exponent (-112 << 23) and round
    out = static_cast<uint16_t>(u >> 13);
    if ((out & 0x7fffu) > 0x7c00u) out = 0x7c00u;  // rounding carried past the largest finite value
  }
  return f16_t{static_cast<uint16_t>(out | sign)};
}

template <typename T> U2A_HD T from_float(float x);
template <> U2A_HD float from_float<float>(float x) { return x; }
template <> U2A_HD bf16_t from_float<bf16_t>(float x) { return to_bf16(x); }
template <> U2A_HD f16_t from_float<f16_t>(float x) { return to_f16(x); }

// Accumulation type of a storage type: fp32 for fp32/bf16/fp16, fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Load into the accumulation type, store from it.
U2A_HD float widen(float x) { return x; }
U2A_HD float widen(bf16_t x) { return to_float(x); }
U2A_HD float widen(f16_t x) { return to_float(x); }
U2A_HD double widen(double x) { return x; }
template <typename T> U2A_HD T narrow(float x) { return from_float<T>(x); }
template <typename T> U2A_HD T narrow(double x) { return static_cast<T>(x); }

// Calls fn(T{}) with T the storage type matching `dtype` (fp32, bf16, fp16).
template <typename Fn>
inline auto dispatch_half_float(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kBFloat16: return fn(bf16_t{});
    case DType::kFloat16: return fn(f16_t{});
    case DType::kFloat32:
    default: return fn(float{});
  }
}

// As dispatch_half_float, plus fp64 (CPU kernels).
template <typename Fn>
inline auto dispatch_float(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat64) return fn(double{});
  return dispatch_half_float(dtype, fn);
}

}  // namespace unif2ace
