// CPU kernels of the grouped MoE (OpenMP). Work is split into fixed-size chunks of tokens or slots, never by the
// thread count, and every cross-chunk reduction runs in chunk order, so results do not depend on the number of
// threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "unif2ace/cpu_math.h"
#include "unif2ace/cpu_scratch.h"
#include "unif2ace/moe.h"

namespace unif2ace {
namespace moe::U2A_CPU_NS {  // one copy per CPU instruction-set level (docs/cpp.md)
namespace {

constexpr int64_t kGateChunk = 256;   // tokens per statistics partial
constexpr int64_t kSortChunk = 4096;  // slots per histogram partial
constexpr int64_t kParallelWork = 1 << 15;  // below this many elements a loop runs on the calling thread

size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return 8;
    case DType::kFloat32: return 4;
    default: return 2;
  }
}

Status check_gate_args(int64_t n_tokens, int64_t n_groups, int64_t n_experts, int64_t top_k,
                       const int64_t* group_ids) {
  if (n_tokens < 0 || n_groups <= 0 || n_experts <= 0)
    return Status::Invalid("moe_gate: need n_tokens >= 0, num_groups > 0 and experts per group > 0");
  if (top_k <= 0 || top_k > n_experts)
    return Status::Invalid("top_k: must lie in [1, " + std::to_string(n_experts) + "] (experts per group), got " +
                           std::to_string(top_k));
  for (int64_t t = 0; t < n_tokens; ++t) {
    if (group_ids[t] < 0 || group_ids[t] >= n_groups)
      return Status::Invalid("group_ids: group_ids[" + std::to_string(t) + "] = " + std::to_string(group_ids[t]) +
                             " is outside [0, " + std::to_string(n_groups) + ")");
  }
  return Status::Ok();
}

// Softmax of one token's group (p, in the accumulation type) and its top-k local expert indices by logit, ties
// to the lower index. `logit` and `taken` are scratch of length E.
template <typename T, typename A>
void softmax_topk(const T* row, int64_t n_experts, int64_t top_k, A* logit, A* p, uint8_t* taken, int64_t* sel) {
  A row_max = -std::numeric_limits<A>::infinity();
  for (int64_t e = 0; e < n_experts; ++e) {
    logit[e] = widen(row[e]);
    row_max = std::fmax(row_max, logit[e]);
    taken[e] = 0;
  }
  A sum = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    p[e] = cpu::exp_acc(logit[e] - row_max);
    sum += p[e];
  }
  const A inv = A(1) / sum;
  for (int64_t e = 0; e < n_experts; ++e) p[e] *= inv;
  for (int64_t j = 0; j < top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < n_experts; ++e) {
      if (taken[e]) continue;
      if (best < 0 || logit[e] > logit[best]) best = e;  // strict '>' keeps the lower index on ties
    }
    taken[best] = 1;
    sel[j] = best;
  }
}

template <typename T, typename A = typename Acc<T>::type>
void gate_forward(const T* logits, int64_t n_tokens, int64_t n_groups, int64_t n_experts, int64_t top_k,
                  const int64_t* group_ids, const uint8_t* token_mask, bool renormalize, A* gates,
                  int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts, A* prob_mean) {
  const int64_t ne = n_groups * n_experts;
  const int64_t n_chunks = (n_tokens + kGateChunk - 1) / kGateChunk;
  std::vector<A> part_probs(static_cast<size_t>(n_chunks * ne), A(0));
  std::vector<int64_t> part_counts(static_cast<size_t>(n_chunks * ne), 0);
  std::vector<int64_t> part_groups(static_cast<size_t>(n_chunks * n_groups), 0);
  // Scratch allocated outside the region: a std::bad_alloc inside it would terminate the process.
  const int threads = cpu::max_threads();
  const cpu::ThreadScratch<A> logit_s(threads, n_experts), p_s(threads, n_experts);
  const cpu::ThreadScratch<uint8_t> taken_s(threads, n_experts);
  const cpu::ThreadScratch<int64_t> sel_s(threads, top_k);
#pragma omp parallel if (n_chunks > 1)
  {
    A *const logit = logit_s.mine(), *const p = p_s.mine();
    uint8_t* const taken = taken_s.mine();
    int64_t* const sel = sel_s.mine();
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; ++c) {
      A* probs_c = part_probs.data() + c * ne;
      int64_t* counts_c = part_counts.data() + c * ne;
      int64_t* groups_c = part_groups.data() + c * n_groups;
      const int64_t end = std::min(n_tokens, (c + 1) * kGateChunk);
      for (int64_t t = c * kGateChunk; t < end; ++t) {
        const int64_t g = group_ids[t];
        softmax_topk(logits + t * ne + g * n_experts, n_experts, top_k, logit, p, taken, sel);
        A chosen = 0;
        for (int64_t j = 0; j < top_k; ++j) chosen += p[sel[j]];
        const A scale = renormalize ? A(1) / chosen : A(1);
        for (int64_t j = 0; j < top_k; ++j) {
          gates[t * top_k + j] = p[sel[j]] * scale;
          expert_ids[t * top_k + j] = g * n_experts + sel[j];
        }
        if (token_mask != nullptr && !token_mask[t]) continue;
        groups_c[g] += 1;
        for (int64_t j = 0; j < top_k; ++j) counts_c[g * n_experts + sel[j]] += 1;
        for (int64_t e = 0; e < n_experts; ++e) probs_c[g * n_experts + e] += p[e];
      }
    }
  }
  for (int64_t g = 0; g < n_groups; ++g) {
    int64_t n = 0;
    for (int64_t c = 0; c < n_chunks; ++c) n += part_groups[c * n_groups + g];
    group_counts[g] = n;
  }
  for (int64_t ge = 0; ge < ne; ++ge) {
    int64_t count = 0;
    A sum = 0;
    for (int64_t c = 0; c < n_chunks; ++c) {
      count += part_counts[c * ne + ge];
      sum += part_probs[c * ne + ge];
    }
    const int64_t n = group_counts[ge / n_experts];
    expert_counts[ge] = count;
    prob_mean[ge] = n > 0 ? sum / static_cast<A>(n) : A(0);
  }
}

template <typename T, typename A = typename Acc<T>::type>
void gate_backward(const T* logits, int64_t n_tokens, int64_t n_groups, int64_t n_experts, int64_t top_k,
                   const int64_t* group_ids, const uint8_t* token_mask, bool renormalize, const int64_t* expert_ids,
                   const int64_t* group_counts, const A* grad_gates, const A* grad_prob_mean, T* grad_logits) {
  const int64_t ne = n_groups * n_experts;
  const int threads = cpu::max_threads();
  const cpu::ThreadScratch<A> logit_s(threads, n_experts), p_s(threads, n_experts), dp_s(threads, n_experts);
  const cpu::ThreadScratch<uint8_t> taken_s(threads, n_experts);
  const cpu::ThreadScratch<int64_t> sel_s(threads, top_k);
#pragma omp parallel if (n_tokens * ne > kParallelWork)
  {
    A *const logit = logit_s.mine(), *const p = p_s.mine(), *const dp = dp_s.mine();
    uint8_t* const taken = taken_s.mine();
    int64_t* const sel = sel_s.mine();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tokens; ++t) {
      const int64_t g = group_ids[t];
      T* out = grad_logits + t * ne;
      const T zero = narrow<T>(A(0));
      for (int64_t c = 0; c < ne; ++c) out[c] = zero;
      softmax_topk(logits + t * ne + g * n_experts, n_experts, top_k, logit, p, taken, sel);
      for (int64_t e = 0; e < n_experts; ++e) dp[e] = 0;
      if (grad_gates != nullptr) {
        const A* gg = grad_gates + t * top_k;
        const int64_t* ids = expert_ids + t * top_k;
        if (renormalize) {
          A chosen = 0;
          for (int64_t j = 0; j < top_k; ++j) chosen += p[ids[j] - g * n_experts];
          // gate_j = p_j / S:  dL/dp_e = (dL/dgate_e - sum_j dL/dgate_j * gate_j) / S for chosen e.
          A dot = 0;
          for (int64_t j = 0; j < top_k; ++j) dot += gg[j] * (p[ids[j] - g * n_experts] / chosen);
          for (int64_t j = 0; j < top_k; ++j) dp[ids[j] - g * n_experts] += (gg[j] - dot) / chosen;
        } else {
          for (int64_t j = 0; j < top_k; ++j) dp[ids[j] - g * n_experts] += gg[j];
        }
      }
      const bool counted = token_mask == nullptr || token_mask[t];
      if (grad_prob_mean != nullptr && counted && group_counts[g] > 0) {
        const A inv_n = A(1) / static_cast<A>(group_counts[g]);
        for (int64_t e = 0; e < n_experts; ++e) dp[e] += grad_prob_mean[g * n_experts + e] * inv_n;
      }
      A pdp = 0;
      for (int64_t e = 0; e < n_experts; ++e) pdp += p[e] * dp[e];
      for (int64_t e = 0; e < n_experts; ++e) out[g * n_experts + e] = narrow<T>(p[e] * (dp[e] - pdp));
    }
  }
}

template <typename T, typename A = typename Acc<T>::type>
void unpermute_sum(const T* rows, int64_t n_tokens, int64_t hidden, int64_t top_k, const int64_t* slot_pos,
                   const A* weights, T* out) {
  const cpu::ThreadScratch<A> acc_s(cpu::max_threads(), hidden);
#pragma omp parallel if (n_tokens * top_k * hidden > kParallelWork)
  {
    A* const acc = acc_s.mine();
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int64_t h = 0; h < hidden; ++h) acc[h] = 0;
      for (int64_t j = 0; j < top_k; ++j) {
        const T* row = rows + slot_pos[t * top_k + j] * hidden;
        const A w = weights != nullptr ? weights[t * top_k + j] : A(1);
        A* a = acc;
#pragma omp simd
        for (int64_t h = 0; h < hidden; ++h) a[h] += w * widen(row[h]);
      }
      T* o = out + t * hidden;
#pragma omp simd
      for (int64_t h = 0; h < hidden; ++h) o[h] = narrow<T>(acc[h]);
    }
  }
}

template <typename T, typename A = typename Acc<T>::type>
void unpermute_sum_backward(const T* grad_out, const T* rows, int64_t n_rows, int64_t hidden, int64_t top_k,
                            const int64_t* sorted_slot, const A* weights, T* grad_rows, A* grad_weights) {
#pragma omp parallel for schedule(static) if (n_rows * hidden > kParallelWork)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t s = sorted_slot[i];
    const T* go = grad_out + (s / top_k) * hidden;
    const T* r = rows + i * hidden;
    T* gr = grad_rows + i * hidden;
    const A w = weights[s];
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t h = 0; h < hidden; ++h) {
      const A g = widen(go[h]);
      gr[h] = narrow<T>(w * g);
      dot += g * widen(r[h]);
    }
    grad_weights[s] = dot;
  }
}

template <typename T, typename A = typename Acc<T>::type>
void scatter_add_rows(const T* rows, int64_t n_rows, int64_t hidden, int64_t top_k, const int64_t* slots,
                      const A* weights, A* out) {
#pragma omp parallel for schedule(static) if (n_rows * hidden > kParallelWork)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t s = slots[i];
    const A w = weights != nullptr ? weights[s] : A(1);
    const T* r = rows + i * hidden;
    A* o = out + (s / top_k) * hidden;
#pragma omp simd
    for (int64_t h = 0; h < hidden; ++h) o[h] += w * widen(r[h]);
  }
}

// GELU (tanh form) and its derivative from one exponential, through 1 + tanh(u) = 2·sigmoid(2u): act = x·s and
// act' = s + 2x·s·(1 - s)·u' with s = 1 / (1 + e^(-2u)), which has no cancellation for negative x (1 + tanh does)
// and saturates cleanly (e^(-2u) -> inf or 0). Written out in the loop (no addressable temporaries), so that it
// vectorises with fast_exp.
constexpr double kGeluK0 = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluK1 = 0.044715;

template <bool kHidW, typename T, typename A = typename Acc<T>::type>
void gelu_tanh_backward_rows(const T* pre, const T* d_hid, int64_t n_rows, int64_t width, const A* row_weights,
                             T* hid_w, T* d_pre, A* row_dot) {
  const A k0 = static_cast<A>(kGeluK0), k1 = static_cast<A>(kGeluK1);
#pragma omp parallel for schedule(static) if (n_rows * width > kParallelWork)
  for (int64_t i = 0; i < n_rows; ++i) {
    const A w = row_weights != nullptr ? row_weights[i] : A(1);
    const T* p = pre + i * width;
    const T* dh = d_hid + i * width;
    T* hw = kHidW ? hid_w + i * width : nullptr;
    T* dp = d_pre + i * width;
    A dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t f = 0; f < width; ++f) {
      const A x = widen(p[f]);
      const A s = A(1) / (A(1) + cpu::exp_acc(A(-2) * k0 * (x + k1 * x * x * x)));
      const A act = x * s;
      const A grad = s + A(2) * x * s * (A(1) - s) * k0 * (A(1) + A(3) * k1 * x * x);
      const A g = widen(dh[f]);
      dot += g * act;
      if constexpr (kHidW) hw[f] = narrow<T>(w * act);
      dp[f] = narrow<T>(w * g * grad);
    }
    if (row_dot != nullptr) row_dot[i] = dot;
  }
}

template <typename T, typename A = typename Acc<T>::type>
void bias_gelu_tanh_rows(T* pre, const T* bias, int64_t n_rows, int64_t width, const int64_t* row_expert, T* act) {
  const A k0 = static_cast<A>(kGeluK0), k1 = static_cast<A>(kGeluK1);
#pragma omp parallel for schedule(static) if (n_rows * width > kParallelWork)
  for (int64_t i = 0; i < n_rows; ++i) {
    T* p = pre + i * width;
    const T* b = bias + row_expert[i] * width;
    T* a = act + i * width;
#pragma omp simd
    for (int64_t f = 0; f < width; ++f) {
      const T rounded = narrow<T>(widen(p[f]) + widen(b[f]));
      const A x = widen(rounded);
      const A s = A(1) / (A(1) + cpu::exp_acc(A(-2) * k0 * (x + k1 * x * x * x)));
      p[f] = rounded;
      a[f] = narrow<T>(x * s);
    }
  }
}

}  // namespace

Status gate_forward_cpu(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                        int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                        void* gates, int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                        void* prob_mean) {
  Status s = check_gate_args(n_tokens, n_groups, n_experts, top_k, group_ids);
  if (!s.ok()) return s;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    gate_forward(static_cast<const T*>(logits), n_tokens, n_groups, n_experts, top_k, group_ids, token_mask,
                 renormalize, static_cast<A*>(gates), expert_ids, expert_counts, group_counts,
                 static_cast<A*>(prob_mean));
  });
  return Status::Ok();
}

Status gate_backward_cpu(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                         int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                         const int64_t* expert_ids, const int64_t* group_counts, const void* grad_gates,
                         const void* grad_prob_mean, void* grad_logits) {
  Status s = check_gate_args(n_tokens, n_groups, n_experts, top_k, group_ids);
  if (!s.ok()) return s;
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t id = expert_ids[t * top_k + j];
      if (id < group_ids[t] * n_experts || id >= (group_ids[t] + 1) * n_experts)
        return Status::Invalid("expert_ids: expert_ids[" + std::to_string(t) + ", " + std::to_string(j) +
                               "] is not an expert of the token's group");
    }
  }
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    gate_backward(static_cast<const T*>(logits), n_tokens, n_groups, n_experts, top_k, group_ids, token_mask,
                  renormalize, expert_ids, group_counts, static_cast<const A*>(grad_gates),
                  static_cast<const A*>(grad_prob_mean), static_cast<T*>(grad_logits));
  });
  return Status::Ok();
}

Status sort_slots_cpu(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts, int64_t* expert_offsets,
                      int64_t* sorted_slot) {
  if (n_slots < 0 || n_experts <= 0) return Status::Invalid("moe_dispatch: need n_slots >= 0 and num_experts > 0");
  for (int64_t s = 0; s < n_slots; ++s) {
    if (expert_ids[s] < 0 || expert_ids[s] >= n_experts)
      return Status::Invalid("expert_ids: entry " + std::to_string(s) + " (flattened) = " +
                             std::to_string(expert_ids[s]) + " is outside [0, " + std::to_string(n_experts) + ")");
  }
  const int64_t n_chunks = (n_slots + kSortChunk - 1) / kSortChunk;
  // hist[c, e]: the count of expert e in chunk c, then the first output row of chunk c's expert-e slots.
  std::vector<int64_t> hist(static_cast<size_t>(n_chunks * n_experts), 0);
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    int64_t* h = hist.data() + c * n_experts;
    const int64_t end = std::min(n_slots, (c + 1) * kSortChunk);
    for (int64_t s = c * kSortChunk; s < end; ++s) h[expert_ids[s]] += 1;
  }
  int64_t running = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    expert_offsets[e] = running;
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t count = hist[c * n_experts + e];
      hist[c * n_experts + e] = running;
      running += count;
    }
  }
  expert_offsets[n_experts] = running;
#pragma omp parallel for schedule(static) if (n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; ++c) {
    int64_t* next = hist.data() + c * n_experts;
    const int64_t end = std::min(n_slots, (c + 1) * kSortChunk);
    for (int64_t s = c * kSortChunk; s < end; ++s) sorted_slot[next[expert_ids[s]]++] = s;
  }
  return Status::Ok();
}

Status invert_permutation_cpu(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos) {
  for (int64_t s = 0; s < n; ++s) slot_pos[s] = -1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = sorted_slot[i];
    if (s < 0 || s >= n || slot_pos[s] != -1)
      return Status::Invalid("sorted_slot: not a permutation of [0, " + std::to_string(n) + ") (entry " +
                             std::to_string(i) + " = " + std::to_string(s) + ")");
    slot_pos[s] = i;
  }
  return Status::Ok();
}

Status permute_rows_cpu(const void* src, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                        const int64_t* sorted_slot, int64_t n_rows, void* out) {
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  for (int64_t i = 0; i < n_rows; ++i) {
    if (sorted_slot[i] < 0 || sorted_slot[i] / top_k >= n_tokens)
      return Status::Invalid("sorted_slot: entry " + std::to_string(i) + " = " + std::to_string(sorted_slot[i]) +
                             " is outside [0, " + std::to_string(n_tokens * top_k) + ")");
  }
  const size_t row_bytes = static_cast<size_t>(hidden) * element_size(dtype);
  if (row_bytes == 0) return Status::Ok();  // H = 0: nothing to copy, and the data pointers may be null
  const char* in = static_cast<const char*>(src);
  char* o = static_cast<char*>(out);
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(row_bytes) * n_rows > 4 * kParallelWork)
  for (int64_t i = 0; i < n_rows; ++i) {
    std::memcpy(o + static_cast<size_t>(i) * row_bytes, in + static_cast<size_t>(sorted_slot[i] / top_k) * row_bytes,
                row_bytes);
  }
  return Status::Ok();
}

Status unpermute_sum_cpu(const void* rows, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                         const int64_t* slot_pos, const void* weights, void* out) {
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  const int64_t n = n_tokens * top_k;
  for (int64_t s = 0; s < n; ++s) {
    if (slot_pos[s] < 0 || slot_pos[s] >= n) return Status::Invalid("sorted_slot: not a permutation");
  }
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    unpermute_sum(static_cast<const T*>(rows), n_tokens, hidden, top_k, slot_pos, static_cast<const A*>(weights),
                  static_cast<T*>(out));
  });
  return Status::Ok();
}

Status unpermute_sum_backward_cpu(const void* grad_out, const void* rows, DType dtype, int64_t n_tokens,
                                  int64_t hidden, int64_t top_k, const int64_t* sorted_slot, const void* weights,
                                  void* grad_rows, void* grad_weights) {
  if (top_k <= 0) return Status::Invalid("top_k: must be positive");
  const int64_t n = n_tokens * top_k;
  for (int64_t i = 0; i < n; ++i) {
    if (sorted_slot[i] < 0 || sorted_slot[i] >= n)
      return Status::Invalid("sorted_slot: entry " + std::to_string(i) + " is outside [0, " + std::to_string(n) + ")");
  }
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    unpermute_sum_backward(static_cast<const T*>(grad_out), static_cast<const T*>(rows), n, hidden, top_k,
                           sorted_slot, static_cast<const A*>(weights), static_cast<T*>(grad_rows),
                           static_cast<A*>(grad_weights));
  });
  return Status::Ok();
}

Status scatter_add_rows_cpu(const void* rows, DType dtype, int64_t n_rows, int64_t hidden, int64_t top_k,
                            const int64_t* slots, int64_t n_tokens, const void* weights, void* out) {
  if (top_k <= 0 || n_rows < 0 || hidden < 0 || n_tokens < 0)
    return Status::Invalid("moe_scatter_add_rows: need top_k > 0 and non-negative sizes");
  std::vector<uint8_t> seen(static_cast<size_t>(n_tokens), 0);
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t s = slots[i];
    if (s < 0 || s / top_k >= n_tokens)
      return Status::Invalid("slots: entry " + std::to_string(i) + " = " + std::to_string(s) + " is outside [0, " +
                             std::to_string(n_tokens * top_k) + ")");
    if (seen[s / top_k]++)
      return Status::Invalid("slots: token " + std::to_string(s / top_k) +
                             " appears twice (the rows of one call must belong to distinct tokens)");
  }
  if (hidden == 0) return Status::Ok();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    scatter_add_rows(static_cast<const T*>(rows), n_rows, hidden, top_k, slots, static_cast<const A*>(weights),
                     static_cast<A*>(out));
  });
  return Status::Ok();
}

Status gelu_tanh_backward_rows_cpu(const void* pre, const void* d_hid, DType dtype, int64_t n_rows, int64_t width,
                                   const void* row_weights, void* hid_w, void* d_pre, void* row_dot) {
  if (n_rows < 0 || width < 0) return Status::Invalid("moe_gelu_backward_rows: sizes must be non-negative");
  if (n_rows == 0) return Status::Ok();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const auto run = [&](auto with_hid_w) {
      gelu_tanh_backward_rows<decltype(with_hid_w)::value>(
          static_cast<const T*>(pre), static_cast<const T*>(d_hid), n_rows, width,
          static_cast<const A*>(row_weights), static_cast<T*>(hid_w), static_cast<T*>(d_pre),
          static_cast<A*>(row_dot));
    };
    if (hid_w != nullptr) run(std::true_type{});
    else run(std::false_type{});
  });
  return Status::Ok();
}

Status bias_gelu_tanh_rows_cpu(void* pre, const void* bias, DType dtype, int64_t n_rows, int64_t width,
                               const int64_t* row_expert, int64_t n_groups, void* act) {
  if (n_rows < 0 || width < 0 || n_groups <= 0)
    return Status::Invalid("moe_bias_gelu_rows: need non-negative sizes and at least one expert");
  for (int64_t i = 0; i < n_rows; ++i) {
    if (row_expert[i] < 0 || row_expert[i] >= n_groups)
      return Status::Invalid("row_expert: entry " + std::to_string(i) + " is outside [0, " + std::to_string(n_groups) +
                             ")");
  }
  if (n_rows == 0 || width == 0) return Status::Ok();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    bias_gelu_tanh_rows(static_cast<T*>(pre), static_cast<const T*>(bias), n_rows, width, row_expert,
                        static_cast<T*>(act));
  });
  return Status::Ok();
}

}  // namespace moe::U2A_CPU_NS
}  // namespace unif2ace
