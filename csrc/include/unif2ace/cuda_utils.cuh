// CUDA helpers shared by the kernel families: launch checking, a device guard, block reductions.
// Included only from .cu files.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "unif2ace/common.h"

namespace unif2ace {
namespace cuda {

inline Status status_from(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  return Status::Cuda(std::string(what) + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the guard's lifetime and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&previous_);
    if (err_ == cudaSuccess && previous_ != device) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    if (err_ == cudaSuccess) cudaSetDevice(previous_);
  }
  Status status() const { return status_from(err_, "selecting the CUDA device"); }

 private:
  int previous_ = 0;
  cudaError_t err_ = cudaSuccess;
};

// Every launch goes through this: a launch error (no driver, bad configuration) becomes a Status.
inline Status check_launch(const char* kernel_name) { return status_from(cudaGetLastError(), kernel_name); }

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_reduce_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction, result broadcast to every thread. `scratch` holds >= 32 values; blockDim.x is a
// multiple of 32. The fixed shuffle tree makes the result independent of scheduling (deterministic).
template <bool IsMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = blockDim.x >> 5;
  v = IsMax ? warp_reduce_max(v) : warp_reduce_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const float identity = IsMax ? -INFINITY : 0.0f;
  v = (lane < n_warps) ? scratch[lane] : identity;
  v = IsMax ? warp_reduce_max(v) : warp_reduce_sum(v);
  return v;
}

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const bf16_t* p) { return to_float(*p); }
__device__ __forceinline__ float load_float(const f16_t* p) { return to_float(*p); }

}  // namespace cuda
}  // namespace unif2ace
