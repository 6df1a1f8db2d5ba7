// Per-thread scratch buffers of the CPU kernels, allocated before an OpenMP region opens.
//
// An exception that leaves an OpenMP region calls std::terminate, so a std::bad_alloc from a buffer allocated
// inside a region takes the whole process down. Kernels therefore allocate here, on the calling thread, where
// a failed allocation throws to the entry point's `guarded` (common.h) and becomes Status::kOutOfMemory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace unif2ace {
namespace cpu {

// The most threads a parallel region opened next by this thread can have.
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// The team for a region of `work` independent iterations: never more threads than iterations.
inline int team_size(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), work)));
}

inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// `count` uninitialised elements for each of `threads` threads; inside the region, mine() is the calling
// thread's block. The region must not have more than `threads` threads.
template <typename T>
class ThreadScratch {
 public:
  ThreadScratch(int threads, int64_t count)
      : count_(static_cast<size_t>(count)), data_(new T[static_cast<size_t>(threads) * count_]) {}
  T* mine() const { return data_.get() + static_cast<size_t>(thread_index()) * count_; }

 private:
  size_t count_;
  std::unique_ptr<T[]> data_;
};

}  // namespace cpu
}  // namespace unif2ace
