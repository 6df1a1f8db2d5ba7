/* The C interface of the unif2ace kernels, for callers that are not C++ (C, Rust, Go, C#, Julia, Python ctypes).
 *
 * Stable across compilers: only fixed-width integers, float/double, plain pointers and plain structs cross it, and
 * no C++ exception does (every one is caught and returned as an error code). Every function that can fail returns
 * an int: UNIF2ACE_OK (0) or an error code, with a message for the calling thread in unif2ace_last_error().
 *
 * Each function is the C form of the C++ entry point of the same name in unif2ace/loss.h, unif2ace/moe.h or
 * unif2ace/sampling.h, with the same arguments, contract and numerics (docs/cpp.md has the per-function notes).
 * Buffers: every pointer is owned by the caller; the library never allocates, frees or keeps a pointer after a call
 * returns. CPU functions take host pointers; *_cuda functions take device pointers of `device` and enqueue their
 * work on `stream` (a cudaStream_t; NULL for the legacy default stream) without synchronising: results are ready
 * when the stream is. In a build without CUDA kernels every *_cuda function returns UNIF2ACE_ERROR_NOT_BUILT, so the
 * set of symbols is the same in every build.
 * Arrays are dense and row-major. "acc" below is the accumulation type: double for UNIF2ACE_FLOAT64 inputs, float
 * otherwise; CUDA functions take float for it.
 */
#ifndef UNIF2ACE_C_API_H_
#define UNIF2ACE_C_API_H_

#include <stdint.h>

#include "unif2ace/version.h"

#if defined(__GNUC__)
#define UNIF2ACE_API __attribute__((visibility("default")))
#else
#define UNIF2ACE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Types --------------------------------------------------------------------------------------------------- */
/* Floating-point element types (passed as int32_t). CUDA functions take the first three. */
enum {
  UNIF2ACE_FLOAT32 = 0,
  UNIF2ACE_BFLOAT16 = 1, /* bit pattern: the top 16 bits of an IEEE float32 */
  UNIF2ACE_FLOAT16 = 2,  /* IEEE binary16 */
  UNIF2ACE_FLOAT64 = 3
};

/* Return codes. */
enum {
  UNIF2ACE_OK = 0,
  UNIF2ACE_ERROR_INVALID_ARGUMENT = 1, /* bad size, id, dtype, NULL pointer, NaN logits...; outputs untouched */
  UNIF2ACE_ERROR_CUDA = 2,             /* a CUDA runtime error (no driver, bad device, launch failure) */
  UNIF2ACE_ERROR_NOT_BUILT = 3,        /* a *_cuda function in a build without CUDA kernels */
  UNIF2ACE_ERROR_OUT_OF_MEMORY = 4,    /* a host allocation (scratch) failed */
  UNIF2ACE_ERROR_INTERNAL = 5          /* any other failure (a bug: please report it) */
};

/* Kinds of raw Philox noise (unif2ace_philox_noise_*). */
enum {
  UNIF2ACE_NOISE_UNIFORM = 0,  /* double in [0, 1) */
  UNIF2ACE_NOISE_GUMBEL = 1,   /* float, Gumbel(0, 1) */
  UNIF2ACE_NOISE_UNIFORM64 = 2 /* the raw 64-bit integer, stored as int64_t bits */
};

/* Options of the D3Diff row kernels (see unif2ace::loss::D3DiffOptions). 32 bytes, no padding. */
typedef struct unif2ace_d3diff_options {
  double alpha;          /* weight of the score-entropy term, finite and >= 0 */
  int64_t n_classes;     /* K of the full row */
  int64_t ignore_index;  /* target value of rows that contribute nothing */
  int32_t sedd;          /* nonzero: score="sedd" (adds phi(u)); 0: score="normalized" */
  int32_t reserved;      /* 0 */
} unif2ace_d3diff_options;

/* One MaskGIT step (see unif2ace::sampling::MaskGitParams). 72 bytes, no padding. */
typedef struct unif2ace_maskgit_params {
  int64_t batch;          /* B */
  int64_t seq_len;        /* N */
  int64_t vocab;          /* K */
  int64_t mask_id;        /* outside [0, K) */
  int64_t n_base;         /* floor(N * gamma(r)) */
  uint64_t seed;          /* Philox key */
  uint64_t offset;        /* Philox offset */
  float guidance_scale;   /* g; used only when uncond_logits is not NULL */
  float inv_temperature;  /* 1 / T */
  float noise_scale;      /* tau * (1 - r): scale of the confidence Gumbel noise */
  int32_t last_step;      /* nonzero: re-mask nothing */
} unif2ace_maskgit_params;

/* Next-token sampling (see unif2ace::sampling::NextTokenParams). 56 bytes, no padding. */
typedef struct unif2ace_next_token_params {
  int64_t batch;          /* B */
  int64_t vocab;          /* V */
  int64_t top_k;          /* <= 0 or >= V: no top-k filter */
  uint64_t seed;
  uint64_t offset;
  double top_p;           /* >= 1: no top-p filter */
  float inv_temperature;  /* 1 / T */
  int32_t greedy;         /* nonzero: the first argmax */
} unif2ace_next_token_params;

/* ---- Library queries ----------------------------------------------------------------------------------------- */
/* The message of the last failed call on the calling thread ("" after a successful one). The pointer stays valid
 * until the thread's next unif2ace_* call. */
UNIF2ACE_API const char* unif2ace_last_error(void);
/* UNIF2ACE_VERSION_STRING and UNIF2ACE_C_ABI_VERSION of the linked library (compare with the header's). */
UNIF2ACE_API const char* unif2ace_version(void);
UNIF2ACE_API int unif2ace_abi_version(void);
/* 1 when the CUDA kernels are inside this build. */
UNIF2ACE_API int unif2ace_built_with_cuda(void);
/* Number of usable CUDA devices (0 and an error code saying why when there are none). */
UNIF2ACE_API int unif2ace_cuda_device_count(int* count);
/* The CPU kernels' instruction-set level in use ("baseline", "avx2", "avx512", or a -march value), a static string. */
UNIF2ACE_API int unif2ace_cpu_isa(const char** name);

/* ---- D3Diff loss rows (unif2ace/loss.h) ------------------------------------------------------------------------ */
/* lse[n] = logsumexp_k logits[n, k], target_logit[n] = logits[n, target[n]]; rows with target == ignore_index get 0.
 * logits [n_rows, n_cols] of dtype; target [n_rows]; lse, target_logit [n_rows] acc. */
UNIF2ACE_API int unif2ace_row_lse_target_cpu(const void* logits, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                             const int64_t* target, int64_t ignore_index, void* lse,
                                             void* target_logit);
UNIF2ACE_API int unif2ace_row_lse_target_cuda(const void* logits, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                              const int64_t* target, int64_t ignore_index, float* lse,
                                              float* target_logit, int device, void* stream);
/* grad[n, k] = coef_softmax[n] * softmax(logits[n])[k] - coef_onehot[n] * [k == target[n]] (grad may be logits). */
UNIF2ACE_API int unif2ace_softmax_onehot_grad_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows,
                                                  int64_t n_cols, const void* lse, const int64_t* target,
                                                  int64_t ignore_index, const void* coef_softmax,
                                                  const void* coef_onehot);
UNIF2ACE_API int unif2ace_softmax_onehot_grad_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows,
                                                   int64_t n_cols, const float* lse, const int64_t* target,
                                                   int64_t ignore_index, const float* coef_softmax,
                                                   const float* coef_onehot, int device, void* stream);

/* The D3Diff loss of whole rows: loss, row_max, log_sum [n_rows] acc; with grad non-NULL (may be logits) also
 * row_scale[n] * dloss/dlogits (row_scale then required). Rows of a buffer with leading dimension ld >= n_cols;
 * row_weight [n_rows] acc is the time weight w. */
UNIF2ACE_API int unif2ace_d3diff_rows_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows, int64_t n_cols,
                                          int64_t ld, const int64_t* target, const void* row_weight,
                                          const void* row_scale, const unif2ace_d3diff_options* opts, void* loss,
                                          void* row_max, void* log_sum);
UNIF2ACE_API int unif2ace_d3diff_rows_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows,
                                           int64_t n_cols, int64_t ld, const int64_t* target, const float* row_weight,
                                           const float* row_scale, const unif2ace_d3diff_options* opts, float* loss,
                                           float* row_max, float* log_sum, int device, void* stream);
/* The gradient of columns [col0, col0 + n_cols) of rows of opts->n_classes classes, from stored statistics. */
UNIF2ACE_API int unif2ace_d3diff_rows_grad_cpu(const void* logits, void* grad, int32_t dtype, int64_t n_rows,
                                               int64_t n_cols, int64_t ld, int64_t col0, const int64_t* target,
                                               const void* row_weight, const void* row_max, const void* log_sum,
                                               const void* row_scale, const unif2ace_d3diff_options* opts);
UNIF2ACE_API int unif2ace_d3diff_rows_grad_cuda(const void* logits, void* grad, int32_t dtype, int64_t n_rows,
                                                int64_t n_cols, int64_t ld, int64_t col0, const int64_t* target,
                                                const float* row_weight, const float* row_max, const float* log_sum,
                                                const float* row_scale, const unif2ace_d3diff_options* opts,
                                                int device, void* stream);

/* ---- Grouped MoE routing (unif2ace/moe.h) ---------------------------------------------------------------------- */
/* Fused gating: logits [n_tokens, n_groups * n_experts]; group_ids [n_tokens]; token_mask [n_tokens] or NULL;
 * gates [n_tokens, top_k] acc; expert_ids [n_tokens, top_k]; expert_counts [n_groups * n_experts];
 * group_counts [n_groups]; prob_mean [n_groups * n_experts] acc. */
UNIF2ACE_API int unif2ace_moe_gate_forward_cpu(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                               int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                               const uint8_t* token_mask, int32_t renormalize, void* gates,
                                               int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                                               void* prob_mean);
/* The CUDA gating needs workspaces: partial_probs [n_blocks, NE] float, partial_counts [n_blocks, NE] and
 * partial_groups [n_blocks, n_groups] int64, n_blocks = ceil(n_tokens / unif2ace_moe_gate_block_tokens()). */
UNIF2ACE_API int unif2ace_moe_gate_forward_cuda(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                                int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                                const uint8_t* token_mask, int32_t renormalize, float* gates,
                                                int64_t* expert_ids, int64_t* expert_counts, int64_t* group_counts,
                                                float* prob_mean, float* partial_probs, int64_t* partial_counts,
                                                int64_t* partial_groups, int device, void* stream);
/* Gradient with respect to the logits; grad_gates [n_tokens, top_k] and grad_prob_mean [NE] acc, either may be NULL. */
UNIF2ACE_API int unif2ace_moe_gate_backward_cpu(const void* logits, int32_t dtype, int64_t n_tokens, int64_t n_groups,
                                                int64_t n_experts, int64_t top_k, const int64_t* group_ids,
                                                const uint8_t* token_mask, int32_t renormalize,
                                                const int64_t* expert_ids, const int64_t* group_counts,
                                                const void* grad_gates, const void* grad_prob_mean, void* grad_logits);
UNIF2ACE_API int unif2ace_moe_gate_backward_cuda(const void* logits, int32_t dtype, int64_t n_tokens,
                                                 int64_t n_groups, int64_t n_experts, int64_t top_k,
                                                 const int64_t* group_ids, const uint8_t* token_mask,
                                                 int32_t renormalize, const int64_t* expert_ids,
                                                 const int64_t* group_counts, const float* grad_gates,
                                                 const float* grad_prob_mean, void* grad_logits, int device,
                                                 void* stream);
/* Stable counting sort of the n_slots expert ids: expert_offsets [n_experts + 1], sorted_slot [n_slots].
 * (n_experts counts all experts here: groups * experts per group.) The CUDA sort needs block_counts
 * [n_blocks, n_experts + 1] int64, n_blocks = ceil(n_slots / unif2ace_moe_sort_block_slots()). */
UNIF2ACE_API int unif2ace_moe_sort_slots_cpu(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                             int64_t* expert_offsets, int64_t* sorted_slot);
UNIF2ACE_API int unif2ace_moe_sort_slots_cuda(const int64_t* expert_ids, int64_t n_slots, int64_t n_experts,
                                              int64_t* expert_offsets, int64_t* sorted_slot, int64_t* block_counts,
                                              int device, void* stream);
/* slot_pos[sorted_slot[i]] = i. */
UNIF2ACE_API int unif2ace_moe_invert_permutation_cpu(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos);
UNIF2ACE_API int unif2ace_moe_invert_permutation_cuda(const int64_t* sorted_slot, int64_t n, int64_t* slot_pos,
                                                      int device, void* stream);
/* out[i, :] = src[sorted_slot[i] / top_k, :] for i < n_rows; src [n_tokens, hidden], out [n_rows, hidden]. */
UNIF2ACE_API int unif2ace_moe_permute_rows_cpu(const void* src, int32_t dtype, int64_t n_tokens, int64_t hidden,
                                               int64_t top_k, const int64_t* sorted_slot, int64_t n_rows, void* out);
UNIF2ACE_API int unif2ace_moe_permute_rows_cuda(const void* src, int32_t dtype, int64_t n_tokens, int64_t hidden,
                                                int64_t top_k, const int64_t* sorted_slot, int64_t n_rows, void* out,
                                                int device, void* stream);
/* out[t, :] = sum_j weights[t, j] * rows[slot_pos[t * top_k + j], :] (weights acc, NULL for 1), j in order. */
UNIF2ACE_API int unif2ace_moe_unpermute_sum_cpu(const void* rows, int32_t dtype, int64_t n_tokens, int64_t hidden,
                                                int64_t top_k, const int64_t* slot_pos, const void* weights,
                                                void* out);
UNIF2ACE_API int unif2ace_moe_unpermute_sum_cuda(const void* rows, int32_t dtype, int64_t n_tokens, int64_t hidden,
                                                 int64_t top_k, const int64_t* slot_pos, const float* weights,
                                                 void* out, int device, void* stream);
/* Backward of unpermute_sum: grad_rows [T * top_k, hidden]; grad_weights [T, top_k] acc. */
UNIF2ACE_API int unif2ace_moe_unpermute_sum_backward_cpu(const void* grad_out, const void* rows, int32_t dtype,
                                                         int64_t n_tokens, int64_t hidden, int64_t top_k,
                                                         const int64_t* sorted_slot, const void* weights,
                                                         void* grad_rows, void* grad_weights);
UNIF2ACE_API int unif2ace_moe_unpermute_sum_backward_cuda(const void* grad_out, const void* rows, int32_t dtype,
                                                          int64_t n_tokens, int64_t hidden, int64_t top_k,
                                                          const int64_t* sorted_slot, const float* weights,
                                                          void* grad_rows, float* grad_weights, int device,
                                                          void* stream);
/* out[slots[i] / top_k, :] += weights[slots[i]] * rows[i, :] (out [n_tokens, hidden] acc; slots of distinct tokens). */
UNIF2ACE_API int unif2ace_moe_scatter_add_rows_cpu(const void* rows, int32_t dtype, int64_t n_rows, int64_t hidden,
                                                   int64_t top_k, const int64_t* slots, int64_t n_tokens,
                                                   const void* weights, void* out);
UNIF2ACE_API int unif2ace_moe_scatter_add_rows_cuda(const void* rows, int32_t dtype, int64_t n_rows, int64_t hidden,
                                                    int64_t top_k, const int64_t* slots, int64_t n_tokens,
                                                    const float* weights, float* out, int device, void* stream);
/* Backward of the GELU (tanh form) expert activation, one pass: see unif2ace::moe::gelu_tanh_backward_rows_cpu. */
UNIF2ACE_API int unif2ace_moe_gelu_tanh_backward_rows_cpu(const void* pre, const void* d_hid, int32_t dtype,
                                                          int64_t n_rows, int64_t width, const void* row_weights,
                                                          void* hid_w, void* d_pre, void* row_dot);
UNIF2ACE_API int unif2ace_moe_gelu_tanh_backward_rows_cuda(const void* pre, const void* d_hid, int32_t dtype,
                                                           int64_t n_rows, int64_t width, const float* row_weights,
                                                           void* hid_w, void* d_pre, float* row_dot, int device,
                                                           void* stream);
/* Block sizes of the CUDA gating and sort kernels (workspace sizes above); 0 in a build without CUDA. */
UNIF2ACE_API int64_t unif2ace_moe_gate_block_tokens(void);
UNIF2ACE_API int64_t unif2ace_moe_sort_block_slots(void);

/* ---- Sampling (unif2ace/sampling.h, unif2ace/philox.h) --------------------------------------------------------- */
/* One MaskGIT step: cond_logits (and uncond_logits, or NULL) [B, N, K]; tokens, new_tokens, sampled [B, N];
 * confidence [B, N] float. dtype: float32, bfloat16 or float16. */
UNIF2ACE_API int unif2ace_maskgit_step_cpu(const void* cond_logits, const void* uncond_logits, int32_t dtype,
                                           const int64_t* tokens, const unif2ace_maskgit_params* params,
                                           int64_t* new_tokens, int64_t* sampled, float* confidence);
UNIF2ACE_API int unif2ace_maskgit_step_cuda(const void* cond_logits, const void* uncond_logits, int32_t dtype,
                                            const int64_t* tokens, const unif2ace_maskgit_params* params,
                                            int64_t* new_tokens, int64_t* sampled, float* confidence, int device,
                                            void* stream);
/* Temperature / top-k / top-p draw of one token per row: logits [B, V], out [B]. */
UNIF2ACE_API int unif2ace_sample_next_token_cpu(const void* logits, int32_t dtype,
                                                const unif2ace_next_token_params* params, int64_t* out);
UNIF2ACE_API int unif2ace_sample_next_token_cuda(const void* logits, int32_t dtype,
                                                 const unif2ace_next_token_params* params, int64_t* out, int device,
                                                 void* stream);
/* Elements 0 .. n-1 of the Philox noise stream (seed, offset) of the given kind (UNIF2ACE_NOISE_*) into out[n]. */
UNIF2ACE_API int unif2ace_philox_noise_cpu(uint64_t seed, uint64_t offset, int64_t n, int32_t kind, void* out);
UNIF2ACE_API int unif2ace_philox_noise_cuda(uint64_t seed, uint64_t offset, int64_t n, int32_t kind, void* out,
                                            int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* UNIF2ACE_C_API_H_ */
