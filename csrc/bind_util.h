// Helpers for the pybind11 layer: read DLPack capsules (torch.utils.dlpack.to_dlpack) into checked views,
// validate arguments with messages that name them, and turn a core Status into a Python exception.
// This is the only place that knows about Python; the kernels see raw pointers.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <vector>

#include "unif2ace/common.h"

namespace unif2ace {
namespace bind {

namespace py = pybind11;

// The DLPack ABI (v0.8 "dltensor" capsule), declared here so the module needs no extra header.
struct DLDevice { int32_t device_type; int32_t device_id; };
struct DLDataType { uint8_t code; uint8_t bits; uint16_t lanes; };
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};
enum : int32_t { kDLCPU = 1, kDLCUDA = 2 };
enum : uint8_t { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };

enum class Kind { kFloat32, kBFloat16, kFloat16, kFloat64, kInt64, kInt32, kBool, kOther };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kFloat32: return "float32";
    case Kind::kBFloat16: return "bfloat16";
    case Kind::kFloat16: return "float16";
    case Kind::kFloat64: return "float64";
    case Kind::kInt64: return "int64";
    case Kind::kInt32: return "int32";
    case Kind::kBool: return "bool";
    default: return "an unsupported dtype";
  }
}

struct View {
  std::string name;
  void* data = nullptr;
  bool cuda = false;
  int device = 0;
  Kind kind = Kind::kOther;
  std::vector<int64_t> shape;

  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t i) const { return shape.at(static_cast<size_t>(i < 0 ? i + dim() : i)); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  DType float_dtype() const {
    switch (kind) {
      case Kind::kBFloat16: return DType::kBFloat16;
      case Kind::kFloat16: return DType::kFloat16;
      case Kind::kFloat64: return DType::kFloat64;
      default: return DType::kFloat32;
    }
  }
  // fp64 for fp64 tensors, fp32 otherwise: the dtype of row statistics computed from this tensor.
  Kind acc_kind() const { return kind == Kind::kFloat64 ? Kind::kFloat64 : Kind::kFloat32; }
  template <typename T> T* ptr() const { return static_cast<T*>(data); }
};

[[noreturn]] inline void fail(const std::string& msg) { throw py::value_error(msg); }

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Reads a DLPack capsule without consuming it (the capsule's destructor still releases the tensor).
inline View view(const py::capsule& capsule, const char* name) {
  if (std::string(capsule.name() ? capsule.name() : "") != "dltensor")
    fail(std::string(name) + ": expected an unconsumed DLPack capsule");
  auto* managed = static_cast<DLManagedTensor*>(capsule.get_pointer());
  const DLTensor& t = managed->dl_tensor;
  View v;
  v.name = name;
  v.data = static_cast<char*>(t.data) + t.byte_offset;
  if (t.device.device_type == kDLCPU) {
    v.cuda = false;
  } else if (t.device.device_type == kDLCUDA) {
    v.cuda = true;
  } else {
    fail(std::string(name) + ": only CPU and CUDA tensors are supported");
  }
  v.device = t.device.device_id;
  v.shape.assign(t.shape, t.shape + t.ndim);
  const DLDataType dt = t.dtype;
  if (dt.lanes != 1) v.kind = Kind::kOther;
  else if (dt.code == kDLFloat && dt.bits == 32) v.kind = Kind::kFloat32;
  else if (dt.code == kDLBfloat && dt.bits == 16) v.kind = Kind::kBFloat16;
  else if (dt.code == kDLFloat && dt.bits == 16) v.kind = Kind::kFloat16;
  else if (dt.code == kDLFloat && dt.bits == 64) v.kind = Kind::kFloat64;
  else if (dt.code == kDLInt && dt.bits == 64) v.kind = Kind::kInt64;
  else if (dt.code == kDLInt && dt.bits == 32) v.kind = Kind::kInt32;
  else if (dt.code == kDLBool || (dt.code == kDLUInt && dt.bits == 8)) v.kind = Kind::kBool;
  // Row-major contiguity (size-1 dimensions may carry any stride; a tensor without elements has no layout).
  int64_t numel = 1;
  for (int32_t i = 0; i < t.ndim; ++i) numel *= t.shape[i];
  if (t.strides != nullptr && numel != 0) {
    int64_t expected = 1;
    for (int32_t i = t.ndim - 1; i >= 0; --i) {
      if (t.shape[i] != 1 && t.strides[i] != expected)
        fail(std::string(name) + ": must be contiguous (call .contiguous())");
      expected *= t.shape[i];
    }
  }
  return v;
}

inline void expect_kind(const View& v, std::initializer_list<Kind> kinds) {
  for (Kind k : kinds)
    if (v.kind == k) return;
  std::string allowed;
  for (Kind k : kinds) allowed += std::string(allowed.empty() ? "" : ", ") + kind_name(k);
  fail(v.name + ": dtype must be one of {" + allowed + "}, got " + kind_name(v.kind));
}

inline void expect_dim(const View& v, int64_t dim) {
  if (v.dim() != dim)
    fail(v.name + ": expected a " + std::to_string(dim) + "-D tensor, got shape " + shape_str(v.shape));
}

inline void expect_shape(const View& v, const std::vector<int64_t>& shape) {
  if (v.shape != shape) fail(v.name + ": expected shape " + shape_str(shape) + ", got " + shape_str(v.shape));
}

inline void expect_same_device(const View& a, const View& b) {
  if (a.cuda != b.cuda || (a.cuda && a.device != b.device))
    fail(b.name + ": must be on the same device as " + a.name);
}

// A host allocation in the core failed; the module's exception translator (bindings.cpp) raises it as
// Python's MemoryError with this message.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Safe to call with the GIL released: it only throws C++ exceptions, which pybind11 translates once the GIL is
// held again.
inline void raise_if_error(const Status& s) {
  if (s.ok()) return;
  if (s.code == Status::kInvalidArgument) throw py::value_error(s.message);
  if (s.code == Status::kOutOfMemory) throw OutOfMemory(s.message);
  throw std::runtime_error(s.message);
}

// Entry for CUDA tensors in a module built without CUDA.
[[noreturn]] inline void no_cuda(const char* op) {
  throw std::runtime_error(std::string(op) +
                           ": unif2ace was built without CUDA kernels (rebuild with UNIF2ACE_CUDA=1 and nvcc)");
}

// Runs one entry point of an op with the GIL released, on the device of `on`: `cpu()`, or `cuda()` for CUDA tensors,
// and raises the Status it returns. In a build without CUDA, `cuda` is never called, so its body (an inline lambda)
// is never emitted and names no missing symbol; CUDA tensors are then reported by no_cuda(op).
template <typename Cpu, typename Cuda>
void run_entry(const char* op, const View& on, Cpu&& cpu, Cuda&& cuda) {
  Status s;
  if (on.cuda) {
#ifdef UNIF2ACE_WITH_CUDA
    py::gil_scoped_release release;
    s = cuda();
#else
    (void)cuda;
    no_cuda(op);
#endif
  } else {
    py::gil_scoped_release release;
    s = cpu();
  }
  raise_if_error(s);
}

// Family registration functions, each defined in csrc/bind_<family>.cpp.
void bind_loss(py::module_& m);
void bind_moe(py::module_& m);
void bind_sampling(py::module_& m);

}  // namespace bind
}  // namespace unif2ace
