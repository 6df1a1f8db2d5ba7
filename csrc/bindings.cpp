// The pybind11 module unif2ace._C: one module for every kernel family. Each family registers its entry
// points from its own csrc/bind_<family>.cpp.
#include <pybind11/pybind11.h>

#include <exception>
#include <new>

#include "bind_util.h"
#include "unif2ace/device.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "unif2ace C++/CUDA kernels (torch-free core; tensors arrive as DLPack capsules)";
  // Every entry point raises a Python exception and never aborts: a core Status becomes ValueError,
  // MemoryError (OutOfMemory) or RuntimeError; a std::bad_alloc thrown outside an OpenMP region becomes
  // MemoryError, and pybind11 turns any other std::exception into RuntimeError.
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const unif2ace::bind::OutOfMemory& e) {
      PyErr_SetString(PyExc_MemoryError, e.what());
    } catch (const std::bad_alloc&) {
      PyErr_SetString(PyExc_MemoryError, "unif2ace: out of memory (a host allocation in the C++ core failed)");
    }
  });
#ifdef UNIF2ACE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def(
      "cuda_device_count",
      [] {
        int count = 0;
        unif2ace::bind::raise_if_error(unif2ace::cuda_device_count(&count));
        return count;
      },
      "Number of CUDA devices the core can use; raises RuntimeError saying why when it can use none.");
  unif2ace::bind::bind_loss(m);
  unif2ace::bind::bind_moe(m);
  unif2ace::bind::bind_sampling(m);
}
