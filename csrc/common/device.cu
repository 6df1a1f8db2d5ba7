#include "unif2ace/cuda_utils.cuh"
#include "unif2ace/device.h"

namespace unif2ace {

bool built_with_cuda() { return true; }

Status cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky error so later calls report their own
    return cuda::status_from(err, "querying CUDA devices");
  }
  return Status::Ok();
}

}  // namespace unif2ace
