// The C ABI (unif2ace/c_api.h) over the C++ entry points. Each function checks what C callers can get wrong and
// the C++ API takes as given (the dtype enum, NULL for a required buffer), calls the C++ function, and turns its
// Status, or any exception, into an error code and the calling thread's message. Nothing is thrown past here.
#include "unif2ace/c_api.h"

#include <new>
#include <stdexcept>
#include <string>

#include "unif2ace/device.h"
#include "unif2ace/loss.h"
#include "unif2ace/moe.h"
#include "unif2ace/sampling.h"

namespace unif2ace {
namespace {

thread_local std::string last_error;

// Raised by the argument checks below; becomes UNIF2ACE_ERROR_INVALID_ARGUMENT.
struct InvalidArgument : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int set_error(int code, const char* message) noexcept {
  try {
    last_error = message;
  } catch (...) {
    last_error.clear();  // no memory even for the message: an empty one, the code still says what happened
  }
  return code;
}

int from_status(const Status& s) noexcept {
  switch (s.code) {
    case Status::kOk: last_error.clear(); return UNIF2ACE_OK;
    case Status::kInvalidArgument: return set_error(UNIF2ACE_ERROR_INVALID_ARGUMENT, s.message.c_str());
    case Status::kCudaError: return set_error(UNIF2ACE_ERROR_CUDA, s.message.c_str());
    case Status::kNotBuilt: return set_error(UNIF2ACE_ERROR_NOT_BUILT, s.message.c_str());
    case Status::kOutOfMemory: return set_error(UNIF2ACE_ERROR_OUT_OF_MEMORY, s.message.c_str());
    case Status::kInternal: return set_error(UNIF2ACE_ERROR_INTERNAL, s.message.c_str());
  }
  return set_error(UNIF2ACE_ERROR_INTERNAL, s.message.c_str());
}

// Runs fn (checks, then the C++ entry point; returns a Status) with every exception caught.
template <typename Fn>
int c_call(Fn&& fn) noexcept {
  try {
    return from_status(fn());
  } catch (const InvalidArgument& e) {
    return set_error(UNIF2ACE_ERROR_INVALID_ARGUMENT, e.what());
  } catch (const std::bad_alloc&) {
    return set_error(UNIF2ACE_ERROR_OUT_OF_MEMORY, "out of memory: a host allocation failed");
  } catch (const std::exception& e) {
    return set_error(UNIF2ACE_ERROR_INTERNAL, e.what());
  } catch (...) {
    return set_error(UNIF2ACE_ERROR_INTERNAL, "unknown C++ exception");
  }
}

DType dtype_arg(int32_t dtype, bool cuda) {
  const int32_t last = cuda ? UNIF2ACE_FLOAT16 : UNIF2ACE_FLOAT64;
  if (dtype < UNIF2ACE_FLOAT32 || dtype > last)
    throw InvalidArgument("dtype: " + std::to_string(dtype) + " is not one of the UNIF2ACE_FLOAT32 .. " +
                          (cuda ? "UNIF2ACE_FLOAT16 (CUDA)" : "UNIF2ACE_FLOAT64") + " values");
  return static_cast<DType>(dtype);
}

// A buffer that must be given whenever it has elements.
void need(const void* p, const char* name, bool has_elements) {
  if (p == nullptr && has_elements) throw InvalidArgument(std::string(name) + ": NULL pointer");
}

template <typename P>
const P& need_params(const P* p) {
  if (p == nullptr) throw InvalidArgument("params: NULL pointer");
  return *p;
}

loss::D3DiffOptions d3diff_options(const unif2ace_d3diff_options* c) {
  if (c == nullptr) throw InvalidArgument("opts: NULL pointer");
  loss::D3DiffOptions o;
  o.alpha = c->alpha;
  o.sedd = c->sedd != 0;
  o.n_classes = c->n_classes;
  o.ignore_index = c->ignore_index;
  return o;
}

sampling::MaskGitParams maskgit_params(const unif2ace_maskgit_params& c) {
  sampling::MaskGitParams p;
  p.batch = c.batch;
  p.seq_len = c.seq_len;
  p.vocab = c.vocab;
  p.mask_id = c.mask_id;
  p.guidance_scale = c.guidance_scale;
  p.inv_temperature = c.inv_temperature;
  p.noise_scale = c.noise_scale;
  p.n_base = c.n_base;
  p.last_step = c.last_step != 0;
  p.seed = c.seed;
  p.offset = c.offset;
  return p;
}

sampling::NextTokenParams next_token_params(const unif2ace_next_token_params& c) {
  sampling::NextTokenParams p;
  p.batch = c.batch;
  p.vocab = c.vocab;
  p.inv_temperature = c.inv_temperature;
  p.greedy = c.greedy != 0;
  p.top_k = c.top_k;
  p.top_p = c.top_p;
  p.seed = c.seed;
  p.offset = c.offset;
  return p;
}

sampling::NoiseKind noise_kind(int32_t kind) {
  if (kind < UNIF2ACE_NOISE_UNIFORM || kind > UNIF2ACE_NOISE_UNIFORM64)
    throw InvalidArgument("kind: " + std::to_string(kind) + " is not one of UNIF2ACE_NOISE_UNIFORM, _GUMBEL, _UNIFORM64");
  return static_cast<sampling::NoiseKind>(kind);
}

}  // namespace
}  // namespace unif2ace

using namespace unif2ace;  // NOLINT: this file only defines the extern "C" functions

// In a build without CUDA kernels the *_cuda functions only report that, leaving their arguments unused.
#ifdef UNIF2ACE_WITH_CUDA
#define U2A_CUDA(name, ...) __VA_ARGS__
#else
#pragma GCC diagnostic ignored "-Wunused-parameter"
#define U2A_CUDA(name, ...) \
  return Status{Status::kNotBuilt, name ": unif2ace was built without CUDA kernels (rebuild with UNIF2ACE_CUDA=1)"}
#endif

extern "C" {

// ---- Library queries ------------------------------------------------------------------------------------------------
const char* unif2ace_last_error(void) { return last_error.c_str(); }
const char* unif2ace_version(void) { return library_version(); }
int unif2ace_abi_version(void) { return UNIF2ACE_C_ABI_VERSION; }
int unif2ace_built_with_cuda(void) { return built_with_cuda() ? 1 : 0; }

int unif2ace_cuda_device_count(int* count) {
  return c_call([&] {
    need(count, "count", true);
    return cuda_device_count(count);
  });
}

int unif2ace_cpu_isa(const char** name) {
  return c_call([&] {
    need(name, "name", true);
    return cpu_isa(name);
  });
}

// ---- Loss rows ----------------------------------------------------------------------------------------------------
int unif2ace_row_lse_target_cpu(const void* logits, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                const int64_t* target, int64_t ignore_index, void* lse, void* target_logit) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {target, "target"}, {lse, "lse"},
                           {target_logit, "target_logit"}})
      need(p, name, n_rows > 0);
    return loss::row_lse_target_cpu(logits, dt, n_rows, n_cols, target, ignore_index, lse, target_logit);
  });
}

int unif2ace_row_lse_target_cuda(const void* logits, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                 const int64_t* target, int64_t ignore_index, float* lse, float* target_logit,
                                 int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_row_lse_target_cuda",
             return loss::row_lse_target_cuda(logits, dtype_arg(dtype, true), n_rows, n_cols, target, ignore_index,
                                              lse, target_logit, device, stream));
  });
}

int unif2ace_softmax_onehot_grad_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                     const void* lse, const int64_t* target, int64_t ignore_index,
                                     const void* coef_softmax, const void* coef_onehot) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {grad, "grad"}, {lse, "lse"},
                           {target, "target"}, {coef_softmax, "coef_softmax"}, {coef_onehot, "coef_onehot"}})
      need(p, name, n_rows > 0);
    return loss::softmax_onehot_grad_cpu(logits, grad, dt, n_rows, n_cols, lse, target, ignore_index, coef_softmax,
                                         coef_onehot);
  });
}

int unif2ace_softmax_onehot_grad_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                      const float* lse, const int64_t* target, int64_t ignore_index,
                                      const float* coef_softmax, const float* coef_onehot, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_softmax_onehot_grad_cuda",
             return loss::softmax_onehot_grad_cuda(logits, grad, dtype_arg(dtype, true), n_rows, n_cols, lse, target,
                                                   ignore_index, coef_softmax, coef_onehot, device, stream));
  });
}

int unif2ace_d3diff_rows_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                             const int64_t* target, const void* row_weight, const void* row_scale,
                             const unif2ace_d3diff_options* opts, void* loss, void* row_max, void* log_sum) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    const loss::D3DiffOptions o = d3diff_options(opts);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {target, "target"},
                           {row_weight, "row_weight"}, {loss, "loss"}, {row_max, "row_max"}, {log_sum, "log_sum"}})
      need(p, name, n_rows > 0);
    return loss::d3diff_rows_cpu(logits, grad, dt, n_rows, n_cols, ld, target, row_weight, row_scale, o, loss,
                                 row_max, log_sum);
  });
}

int unif2ace_d3diff_rows_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                              int64_t ld, const int64_t* target, const float* row_weight, const float* row_scale,
                              const unif2ace_d3diff_options* opts, float* loss, float* row_max, float* log_sum,
                              int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_d3diff_rows_cuda",
             return loss::d3diff_rows_cuda(logits, grad, dtype_arg(dtype, true), n_rows, n_cols, ld, target,
                                           row_weight, row_scale, d3diff_options(opts), loss, row_max, log_sum,
                                           device, stream));
  });
}

int unif2ace_d3diff_rows_grad_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                  int64_t ld, int64_t col0, const int64_t* target, const void* row_weight,
                                  const void* row_max, const void* log_sum, const void* row_scale,
                                  const unif2ace_d3diff_options* opts) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    const loss::D3DiffOptions o = d3diff_options(opts);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {grad, "grad"}, {target, "target"},
                           {row_weight, "row_weight"}, {row_max, "row_max"}, {log_sum, "log_sum"},
                           {row_scale, "row_scale"}})
      need(p, name, n_rows > 0);
    return loss::d3diff_rows_grad_cpu(logits, grad, dt, n_rows, n_cols, ld, col0, target, row_weight, row_max,
                                      log_sum, row_scale, o);
  });
}

int unif2ace_d3diff_rows_grad_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                   int64_t ld, int64_t col0, const int64_t* target, const float* row_weight,
                                   const float* row_max, const float* log_sum, const float* row_scale,
                                   const unif2ace_d3diff_options* opts, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_d3diff_rows_grad_cuda",
             return loss::d3diff_rows_grad_cuda(logits, grad, dtype_arg(dtype, true), n_rows, n_cols, ld, col0,
                                                target, row_weight, row_max, log_sum, row_scale,
                                                d3diff_options(opts), device, stream));
  });
}

// ---- MoE routing ----------------------------------------------------------------------------------------------------
int unif2ace_moe_gate_forward_cpu(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                  int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                  const uint8_t* token_mask, int32_t renormalize, void* gates, int64_t* expert_ids,
                                  int64_t* expert_counts, int64_t* group_counts, void* prob_mean) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {group_ids, "group_ids"},
                           {gates, "gates"}, {expert_ids, "expert_ids"}})
      need(p, name, n_tokens > 0);
    for (auto [p, name] : {std::pair<const void*, const char*>{expert_counts, "expert_counts"},
                           {group_counts, "group_counts"}, {prob_mean, "prob_mean"}})
      need(p, name, true);
    return moe::gate_forward_cpu(logits, dt, n_tokens, n_groups, n_experts, top_k, group_ids, token_mask,
                                 renormalize != 0, gates, expert_ids, expert_counts, group_counts, prob_mean);
  });
}

int unif2ace_moe_gate_forward_cuda(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                   int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                   const uint8_t* token_mask, int32_t renormalize, float* gates, int64_t* expert_ids,
                                   int64_t* expert_counts, int64_t* group_counts, float* prob_mean,
                                   float* partial_probs, int64_t* partial_counts, int64_t* partial_groups,
                                   int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_gate_forward_cuda",
             return moe::gate_forward_cuda(logits, dtype_arg(dtype, true), n_tokens, n_groups, n_experts, top_k,
                                           group_ids, token_mask, renormalize != 0, gates, expert_ids, expert_counts,
                                           group_counts, prob_mean, partial_probs, partial_counts, partial_groups,
                                           device, stream));
  });
}

int unif2ace_moe_gate_backward_cpu(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                   int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                   const uint8_t* token_mask, int32_t renormalize, const int64_t* expert_ids,
                                   const int64_t* group_counts, const void* grad_gates, const void* grad_prob_mean,
                                   void* grad_logits) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{logits, "logits"}, {group_ids, "group_ids"},
                           {expert_ids, "expert_ids"}, {grad_logits, "grad_logits"}})
      need(p, name, n_tokens > 0);
    need(group_counts, "group_counts", true);
    return moe::gate_backward_cpu(logits, dt, n_tokens, n_groups, n_experts, top_k, group_ids, token_mask,
                                  renormalize != 0, expert_ids, group_counts, grad_gates, grad_prob_mean,
                                  grad_logits);
  });
}

int unif2ace_moe_gate_backward_cuda(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                    int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                    const uint8_t* token_mask, int32_t renormalize, const int64_t* expert_ids,
                                    const int64_t* group_counts, const float* grad_gates,
                                    const float* grad_prob_mean, void* grad_logits, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_gate_backward_cuda",
             return moe::gate_backward_cuda(logits, dtype_arg(dtype, true), n_tokens, n_groups, n_experts, top_k,
                                            group_ids, token_mask, renormalize != 0, expert_ids, group_counts,
                                            grad_gates, grad_prob_mean, grad_logits, device, stream));
  });
}

int unif2ace_moe_sort_slots_cpu(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                int64_t* expert_offsets, int64_t* sorted_slot) {
  return c_call([&] {
    need(expert_ids, "expert_ids", n_slots > 0);
    need(sorted_slot, "sorted_slot", n_slots > 0);
    need(expert_offsets, "expert_offsets", true);
    return moe::sort_slots_cpu(expert_ids, n_slots, n_experts, expert_offsets, sorted_slot);
  });
}

int unif2ace_moe_sort_slots_cuda(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                 int64_t* expert_offsets, int64_t* sorted_slot, int64_t* block_counts, int device,
                                 void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_sort_slots_cuda",
             return moe::sort_slots_cuda(expert_ids, n_slots, n_experts, expert_offsets, sorted_slot, block_counts,
                                         device, stream));
  });
}

int unif2ace_moe_invert_permutation_cpu(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos) {
  return c_call([&] {
    need(sorted_slot, "sorted_slot", n > 0);
    need(slot_pos, "slot_pos", n > 0);
    return moe::invert_permutation_cpu(sorted_slot, n, slot_pos);
  });
}

int unif2ace_moe_invert_permutation_cuda(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos, int device,
                                         void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_invert_permutation_cuda",
             return moe::invert_permutation_cuda(sorted_slot, n, slot_pos, device, stream));
  });
}

int unif2ace_moe_permute_rows_cpu(const void* src, int32_t dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                                  const int64_t* sorted_slot, int64_t n_rows, void* out) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    need(src, "src", n_tokens > 0 && hidden > 0);
    need(sorted_slot, "sorted_slot", n_rows > 0);
    need(out, "out", n_rows > 0 && hidden > 0);
    return moe::permute_rows_cpu(src, dt, n_tokens, hidden, top_k, sorted_slot, n_rows, out);
  });
}

int unif2ace_moe_permute_rows_cuda(const void* src, int32_t dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                                   const int64_t* sorted_slot, int64_t n_rows, void* out, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_permute_rows_cuda",
             return moe::permute_rows_cuda(src, dtype_arg(dtype, true), n_tokens, hidden, top_k, sorted_slot, n_rows,
                                           out, device, stream));
  });
}

int unif2ace_moe_unpermute_sum_cpu(const void* rows, int32_t dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                                   const int64_t* slot_pos, const void* weights, void* out) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    need(rows, "rows", n_tokens > 0 && hidden > 0);
    need(slot_pos, "slot_pos", n_tokens > 0);
    need(out, "out", n_tokens > 0 && hidden > 0);
    return moe::unpermute_sum_cpu(rows, dt, n_tokens, hidden, top_k, slot_pos, weights, out);
  });
}

int unif2ace_moe_unpermute_sum_cuda(const void* rows, int32_t dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                                    const int64_t* slot_pos, const float* weights, void* out, int device,
                                    void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_unpermute_sum_cuda",
             return moe::unpermute_sum_cuda(rows, dtype_arg(dtype, true), n_tokens, hidden, top_k, slot_pos, weights,
                                            out, device, stream));
  });
}

int unif2ace_moe_unpermute_sum_backward_cpu(const void* grad_out, const void* rows, int32_t dtype, int64_t n_tokens,
                                            int64_t hidden, int64_t top_k, const int64_t* sorted_slot,
                                            const void* weights, void* grad_rows, void* grad_weights) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{grad_out, "grad_out"}, {rows, "rows"},
                           {sorted_slot, "sorted_slot"}, {grad_rows, "grad_rows"}})
      need(p, name, n_tokens > 0 && hidden > 0);
    return moe::unpermute_sum_backward_cpu(grad_out, rows, dt, n_tokens, hidden, top_k, sorted_slot, weights,
                                           grad_rows, grad_weights);
  });
}

int unif2ace_moe_unpermute_sum_backward_cuda(const void* grad_out, const void* rows, int32_t dtype, int64_t n_tokens,
                                             int64_t hidden, int64_t top_k, const int64_t* sorted_slot,
                                             const float* weights, void* grad_rows, float* grad_weights, int device,
                                             void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_unpermute_sum_backward_cuda",
             return moe::unpermute_sum_backward_cuda(grad_out, rows, dtype_arg(dtype, true), n_tokens, hidden, top_k,
                                                     sorted_slot, weights, grad_rows, grad_weights, device, stream));
  });
}

int unif2ace_moe_scatter_add_rows_cpu(const void* rows, int32_t dtype, int64_t n_rows, int64_t hidden, int64_t top_k,
                                      const int64_t* slots, int64_t n_tokens, const void* weights, void* out) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    need(rows, "rows", n_rows > 0 && hidden > 0);
    need(slots, "slots", n_rows > 0);
    need(out, "out", n_tokens > 0 && hidden > 0);
    return moe::scatter_add_rows_cpu(rows, dt, n_rows, hidden, top_k, slots, n_tokens, weights, out);
  });
}

int unif2ace_moe_scatter_add_rows_cuda(const void* rows, int32_t dtype, int64_t n_rows, int64_t hidden,
                                       int64_t top_k, const int64_t* slots, int64_t n_tokens, const float* weights,
                                       float* out, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_scatter_add_rows_cuda",
             return moe::scatter_add_rows_cuda(rows, dtype_arg(dtype, true), n_rows, hidden, top_k, slots, n_tokens,
                                               weights, out, device, stream));
  });
}

int unif2ace_moe_gelu_tanh_backward_rows_cpu(const void* pre, const void* d_hid, int32_t dtype, int64_t n_rows,
                                             int64_t width, const void* row_weights, void* hid_w, void* d_pre,
                                             void* row_dot) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    for (auto [p, name] : {std::pair<const void*, const char*>{pre, "pre"}, {d_hid, "d_hid"}, {hid_w, "hid_w"},
                           {d_pre, "d_pre"}})
      need(p, name, n_rows > 0 && width > 0);
    return moe::gelu_tanh_backward_rows_cpu(pre, d_hid, dt, n_rows, width, row_weights, hid_w, d_pre, row_dot);
  });
}

int unif2ace_moe_gelu_tanh_backward_rows_cuda(const void* pre, const void* d_hid, int32_t dtype, int64_t n_rows,
                                              int64_t width, const float* row_weights, void* hid_w, void* d_pre,
                                              float* row_dot, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_moe_gelu_tanh_backward_rows_cuda",
             return moe::gelu_tanh_backward_rows_cuda(pre, d_hid, dtype_arg(dtype, true), n_rows, width, row_weights,
                                                      hid_w, d_pre, row_dot, device, stream));
  });
}

#ifdef UNIF2ACE_WITH_CUDA
int64_t unif2ace_moe_gate_block_tokens(void) { return moe::gate_block_tokens(); }
int64_t unif2ace_moe_sort_block_slots(void) { return moe::sort_block_slots(); }
#else
int64_t unif2ace_moe_gate_block_tokens(void) { return 0; }
int64_t unif2ace_moe_sort_block_slots(void) { return 0; }
#endif

// ---- Sampling ------------------------------------------------------------------------------------------------------
int unif2ace_maskgit_step_cpu(const void* cond_logits, const void* uncond_logits, int32_t dtype,
                              const int64_t* tokens, const unif2ace_maskgit_params* params, int64_t* new_tokens,
                              int64_t* sampled, float* confidence) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    const sampling::MaskGitParams p = maskgit_params(need_params(params));
    const bool any = p.batch > 0 && p.seq_len > 0;
    for (auto [ptr, name] : {std::pair<const void*, const char*>{cond_logits, "cond_logits"}, {tokens, "tokens"},
                             {new_tokens, "new_tokens"}, {sampled, "sampled"}, {confidence, "confidence"}})
      need(ptr, name, any);
    return sampling::maskgit_step_cpu(cond_logits, uncond_logits, dt, tokens, p, new_tokens, sampled, confidence);
  });
}

int unif2ace_maskgit_step_cuda(const void* cond_logits, const void* uncond_logits, int32_t dtype,
                               const int64_t* tokens, const unif2ace_maskgit_params* params, int64_t* new_tokens,
                               int64_t* sampled, float* confidence, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_maskgit_step_cuda",
             return sampling::maskgit_step_cuda(cond_logits, uncond_logits, dtype_arg(dtype, true), tokens,
                                                maskgit_params(need_params(params)), new_tokens, sampled, confidence,
                                                device, stream));
  });
}

int unif2ace_sample_next_token_cpu(const void* logits, int32_t dtype, const unif2ace_next_token_params* params,
                                   int64_t* out) {
  return c_call([&] {
    const DType dt = dtype_arg(dtype, false);
    const sampling::NextTokenParams p = next_token_params(need_params(params));
    need(logits, "logits", p.batch > 0);
    need(out, "out", p.batch > 0);
    return sampling::sample_next_token_cpu(logits, dt, p, out);
  });
}

int unif2ace_sample_next_token_cuda(const void* logits, int32_t dtype, const unif2ace_next_token_params* params,
                                    int64_t* out, int device, void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_sample_next_token_cuda",
             return sampling::sample_next_token_cuda(logits, dtype_arg(dtype, true),
                                                     next_token_params(need_params(params)), out, device, stream));
  });
}

int unif2ace_philox_noise_cpu(uint64_t seed, uint64_t offset, int64_t n, int32_t kind, void* out) {
  return c_call([&] {
    const sampling::NoiseKind k = noise_kind(kind);
    need(out, "out", n > 0);
    return sampling::philox_noise_cpu(seed, offset, n, k, out);
  });
}

int unif2ace_philox_noise_cuda(uint64_t seed, uint64_t offset, int64_t n, int32_t kind, void* out, int device,
                               void* stream) {
  return c_call([&] {
    U2A_CUDA("unif2ace_philox_noise_cuda",
             return sampling::philox_noise_cuda(seed, offset, n, noise_kind(kind), out, device, stream));
  });
}

}  // extern "C"
