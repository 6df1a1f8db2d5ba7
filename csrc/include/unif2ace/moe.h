// Kernels of the grouped mixture-of-experts (DESIGN section 5): fused gating, the expert-sorted permutation
// of the (token, slot) pairs, the row gather into expert order and the weighted combine back to token order.
//
// Conventions.
//   T tokens, G groups of E experts each (NE = G*E experts in all, global id = g*E + e), top-k slots per token.
//   A slot is s = t*k + j. The permutation sorts slots by expert, and within an expert by ascending slot
//   (a stable counting sort: the order is unique, so it does not depend on the thread count or launch shape).
//   sorted_slot[i] is the slot stored in expert-sorted row i; slot_pos is its inverse (slot_pos[s] = i).
//   Floating vectors that are not activations (gates, router probability means, their gradients) are in the
//   accumulation type: fp32, or fp64 for fp64 inputs (CPU only).
//   Every result is bit-identical across runs: sums run in a fixed order, and no float atomics are used.
#pragma once

#include "unif2ace/common.h"

namespace unif2ace {
namespace moe {

// ---- Fused gating --------------------------------------------------------------------------------------------
// For token t with group g = group_ids[t]: p = softmax(logits[t, g*E : (g+1)*E]); the top-k experts by logit
// (equivalently by p; ties go to the lower expert index); gates[t, j] = p of the j-th chosen expert, divided by
// the sum of the k chosen probabilities when `renormalize`; expert_ids[t, j] = its global id (descending
// probability order). Statistics, over the tokens whose token_mask entry is nonzero (all tokens when
// token_mask is null):
//   expert_counts[ge]   number of those (token, slot) pairs routed to ge
//   group_counts[g]     number of those tokens in group g
//   prob_mean[ge]       mean of p_ge over those tokens of ge's group (0 when the group has none)
// The [T, NE] probability matrix is never written. logits is [T, NE] row-major of `dtype`.
Status gate_forward_cpu(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                        int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                        void* gates, int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                        void* prob_mean);

// Gradient of a loss L(gates, prob_mean) with respect to the logits, the softmax of each token's group
// recomputed from the logits: grad_logits[t, :] (in `dtype`) is zero outside the token's group. grad_gates is
// [T, k] and grad_prob_mean [NE], both in the accumulation type; either may be null (treated as zero).
Status gate_backward_cpu(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                         int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                         const int64_t* expert_ids, const int64_t* group_counts, const void* grad_gates,
                         const void* grad_prob_mean, void* grad_logits);

// ---- Permutation -----------------------------------------------------------------------------------------------
// Stable counting sort of the n_slots = T*k expert ids: expert_offsets[NE + 1] (exclusive prefix sums of the
// per-expert counts) and sorted_slot[n_slots]. On the CPU an id outside [0, NE) is an error.
Status sort_slots_cpu(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts, int64_t* expert_offsets,
                      int64_t* sorted_slot);

// slot_pos[sorted_slot[i]] = i. On the CPU a sorted_slot that is not a permutation of [0, n) is an error.
Status invert_permutation_cpu(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos);

// out[i, :] = src[sorted_slot[i] / k, :] for i < n_rows (src is [T, H], out [n_rows, H], both of `dtype`).
Status permute_rows_cpu(const void* src, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                        const int64_t* sorted_slot, int64_t n_rows, void* out);

// out[t, :] = sum_{j = 0..k-1} w[t, j] * rows[slot_pos[t*k + j], :], summed in the order j = 0, 1, ... in the
// accumulation type; w is [T, k] in the accumulation type, or null for weights of 1.
Status unpermute_sum_cpu(const void* rows, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                         const int64_t* slot_pos, const void* weights, void* out);

// Backward of unpermute_sum with weights, in one pass over the sorted rows i (slot s = sorted_slot[i],
// t = s / k): grad_rows[i, :] = w[s] * grad_out[t, :]; grad_weights[s] = <grad_out[t, :], rows[i, :]>.
Status unpermute_sum_backward_cpu(const void* grad_out, const void* rows, DType dtype, int64_t n_tokens,
                                  int64_t hidden, int64_t top_k, const int64_t* sorted_slot, const void* weights,
                                  void* grad_rows, void* grad_weights);

// Expert-at-a-time combine: out[sl[i] / k, :] += w[sl[i]] * rows[i, :] for i < n_rows (w null: weight 1), with
// out [T, H] in the accumulation type and rows [n_rows, H] of `dtype`. The n_rows slots must belong to distinct
// tokens, as the rows of one expert do (a token picks an expert at most once), so the rows are added in parallel
// without races and each token's sum runs in the order of the calls. On the CPU an out-of-range slot or a repeated
// token is an InvalidArgument error, with `out` untouched.
Status scatter_add_rows_cpu(const void* rows, DType dtype, int64_t n_rows, int64_t hidden, int64_t top_k,
                            const int64_t* slots, int64_t n_tokens, const void* weights, void* out);

// ---- Expert activation backward ----------------------------------------------------------------------------------
// One pass over an expert's hidden rows for the backward of act = GELU, tanh form
// (act(x) = x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))), with per-row gate weights w (null: 1):
//   hid_w[i, f] = w[i] · act(pre[i, f])                    the W2 gradient is dyᵀ·hid_w
//   d_pre[i, f] = w[i] · d_hid[i, f] · act'(pre[i, f])     d_hid = dy·W2 of the unweighted output gradient
//   row_dot[i]  = Σ_f d_hid[i, f] · act(pre[i, f])         the gate gradient, less ⟨dy, b2⟩ (row_dot may be null)
// hid_w may be null (not written); d_pre may be d_hid itself (each element is read before it is written).
// pre, d_hid, hid_w, d_pre: [n_rows, F] of `dtype`; w and row_dot in the accumulation type. One tanh per element
// where separate activation, product, row-sum and activation-backward passes would read the rows five times.
Status gelu_tanh_backward_rows_cpu(const void* pre, const void* d_hid, DType dtype, int64_t n_rows, int64_t width,
                                   const void* row_weights, void* hid_w, void* d_pre, void* row_dot);

// The grouped expert pass's first bias and activation in one pass over the expert-sorted hidden rows:
//   pre[i, f] += bias[row_expert[i], f]      in place (rounded to `dtype`: the value the backward reads)
//   act[i, f]  = GELU(pre[i, f])             tanh form, from the rounded sum
// pre, act: [n_rows, F] of `dtype`; bias: [n_groups, F] of `dtype`; row_expert: [n_rows] int64. On the CPU an
// expert id outside [0, n_groups) is an error; the CUDA kernel adds no bias for one (it stays in bounds).
Status bias_gelu_tanh_rows_cpu(void* pre, const void* bias, DType dtype, int64_t n_rows, int64_t width,
                               const int64_t* row_expert, int64_t n_groups, void* act);

// ---- CUDA versions (fp32/bf16/fp16 activations and logits, fp32 vectors) -----------------------------------------
// Same contracts on device pointers, enqueued on `stream` (a cudaStream_t) of `device`. Ids cannot be checked on
// the device without a host synchronisation, so the CUDA kernels never read or write out of bounds instead:
//   * a token whose group id is out of range gets expert ids -1, gates 0, and no statistics;
//   * an expert id outside [0, NE) (including -1) sorts into a trailing bucket after every real expert, so
//     expert_offsets[NE] counts only the valid slots and the rows after it belong to no expert;
//   * a sorted_slot entry outside [0, T*k) gives a zero row in permute_rows and is skipped by the others.
// On the CPU every one of these is an InvalidArgument error instead.
// Limits of the CUDA kernels: at most 64 experts per group in the gating kernels (one thread per token keeps
// the group's logits in registers), fewer than 4096 experts in all for the sort (per-block histograms in shared
// memory). Workspaces are allocated by the caller, sized with the block constants below.
int64_t gate_block_tokens();            // tokens per block of the gating kernel
int64_t sort_block_slots();             // slots per block of the sort kernels

// partial_probs [n_blocks, NE] float; partial_counts [n_blocks, NE] int64; partial_groups [n_blocks, G] int64,
// with n_blocks = ceil(T / gate_block_tokens()).
Status gate_forward_cuda(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                         int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                         float* gates, int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                         float* prob_mean, float* partial_probs, int64_t* partial_counts, int64_t* partial_groups,
                         int device, void* stream);
Status gate_backward_cuda(const void* logits, DType dtype, int64_t n_tokens, int64_t n_groups, int64_t n_experts,
                          int64_t top_k, const int64_t* group_ids, const uint8_t* token_mask, bool renormalize,
                          const int64_t* expert_ids, const int64_t* group_counts, const float* grad_gates,
                          const float* grad_prob_mean, void* grad_logits, int device, void* stream);
// block_counts: workspace [n_blocks, NE + 1] int64 with n_blocks = ceil(n_slots / sort_block_slots()).
Status sort_slots_cuda(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts, int64_t* expert_offsets,
                       int64_t* sorted_slot, int64_t* block_counts, int device, void* stream);
Status invert_permutation_cuda(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos, int device, void* stream);
Status permute_rows_cuda(const void* src, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                         const int64_t* sorted_slot, int64_t n_rows, void* out, int device, void* stream);
Status unpermute_sum_cuda(const void* rows, DType dtype, int64_t n_tokens, int64_t hidden, int64_t top_k,
                          const int64_t* slot_pos, const float* weights, void* out, int device, void* stream);
Status unpermute_sum_backward_cuda(const void* grad_out, const void* rows, DType dtype, int64_t n_tokens,
                                   int64_t hidden, int64_t top_k, const int64_t* sorted_slot, const float* weights,
                                   void* grad_rows, float* grad_weights, int device, void* stream);
// Slots outside [0, T*k) are skipped; repeated tokens race (undefined sum, still in bounds).
Status scatter_add_rows_cuda(const void* rows, DType dtype, int64_t n_rows, int64_t hidden, int64_t top_k,
                             const int64_t* slots, int64_t n_tokens, const float* weights, float* out, int device,
                             void* stream);
Status gelu_tanh_backward_rows_cuda(const void* pre, const void* d_hid, DType dtype, int64_t n_rows, int64_t width,
                                    const float* row_weights, void* hid_w, void* d_pre, float* row_dot, int device,
                                    void* stream);
Status bias_gelu_tanh_rows_cuda(void* pre, const void* bias, DType dtype, int64_t n_rows, int64_t width,
                                const int64_t* row_expert, int64_t n_groups, void* act, int device, void* stream);

}  // namespace moe
}  // namespace unif2ace
