// Device queries of the core, so that embedding programs (and the Python layer) can learn whether the
// CUDA kernels can run here before calling one.
#pragma once

#include "unif2ace/common.h"

namespace unif2ace {

// True when this build contains the CUDA kernels.
bool built_with_cuda();

// Number of usable CUDA devices. Without CUDA in the build, or without a driver/GPU, returns a failed Status
// that says why (never crashes).
Status cuda_device_count(int* count);

}  // namespace unif2ace
