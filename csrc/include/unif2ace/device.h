// Device and build queries of the core, so that embedding programs (and the Python layer) can learn what this
// build contains and what runs here before calling a kernel.
#pragma once

#include "unif2ace/common.h"
#include "unif2ace/version.h"

namespace unif2ace {

// True when this build contains the CUDA kernels.
bool built_with_cuda();

// Number of usable CUDA devices. Without CUDA in the build, or without a driver/GPU, returns a failed Status
// that says why (never crashes).
Status cuda_device_count(int* count);

// The instruction-set level of the CPU kernels this process runs, as *name (a static string):
//   portable x86-64 builds: "baseline" (SSE2), "avx2" (x86-64-v3) or "avx512" (x86-64-v4), the best this CPU
//     supports, capped by the environment variable UNIF2ACE_CPU_ISA (baseline|avx2|avx512|auto) when set;
//   other builds: "baseline", or the -march value they were built for (e.g. "native").
// The level is chosen once per process, at the first kernel call or query. An unknown UNIF2ACE_CPU_ISA value is an
// InvalidArgument error, here and from every CPU kernel.
Status cpu_isa(const char** name);

// The version of the library that is linked (UNIF2ACE_VERSION_STRING when it was built), to compare with the
// headers' UNIF2ACE_VERSION_STRING at run time.
const char* library_version();

}  // namespace unif2ace
