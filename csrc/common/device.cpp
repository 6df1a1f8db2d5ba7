#include "unif2ace/device.h"

namespace unif2ace {

const char* library_version() { return UNIF2ACE_VERSION_STRING; }

#ifndef UNIF2ACE_WITH_CUDA
bool built_with_cuda() { return false; }

Status cuda_device_count(int* count) {
  *count = 0;
  return Status{Status::kNotBuilt, "unif2ace was built without CUDA kernels (rebuild with UNIF2ACE_CUDA=1)"};
}
#endif

}  // namespace unif2ace
