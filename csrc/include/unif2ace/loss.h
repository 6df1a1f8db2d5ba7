// Row kernels under the D3Diff loss (docs/design.md §4). The loss only needs, per row of logits z[N, K],
// the log-sum-exp and the target logit; its gradient with respect to the logits is a per-row
// coefficient times the softmax minus a per-row coefficient times the one-hot of the target.
//
// Row vectors (lse, target_logit, coefficients) are in the accumulation type: fp32, or fp64 for fp64
// logits (CPU only).
#pragma once

#include <cmath>

#include "unif2ace/common.h"

namespace unif2ace {
namespace loss {

// lse[n] = logsumexp_k z[n, k] and target_logit[n] = z[n, target[n]] for row-major contiguous z[N, K] of
// `dtype`. Rows whose target equals ignore_index are skipped and get 0 in both outputs. A target outside
// [0, K) that is not ignore_index is an error (nothing is read out of bounds).
Status row_lse_target_cpu(const void* logits, DType dtype, int64_t n_rows, int64_t n_cols, const int64_t* target,
                          int64_t ignore_index, void* lse, void* target_logit);

// grad[n, k] = coef_softmax[n] * softmax(z[n])[k] - coef_onehot[n] * [k == target[n]], written in `dtype`.
// `grad` may be the same buffer as `logits` (in place). Rows whose target equals ignore_index get zeros.
// `lse` is the output of row_lse_target for the same logits.
Status softmax_onehot_grad_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols,
                               const void* lse, const int64_t* target, int64_t ignore_index,
                               const void* coef_softmax, const void* coef_onehot);

// CUDA versions (fp32/bf16/fp16 logits, fp32 row vectors): the same contract on device pointers, enqueued on
// `stream` (a cudaStream_t) of `device`. On the device an out-of-range target cannot raise without a host
// synchronisation: such a row gets NaN in lse and target_logit and a zero gradient row; nothing outside the
// row is touched.
Status row_lse_target_cuda(const void* logits, DType dtype, int64_t n_rows, int64_t n_cols, const int64_t* target,
                           int64_t ignore_index, float* lse, float* target_logit, int device, void* stream);
Status softmax_onehot_grad_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols,
                                const float* lse, const int64_t* target, int64_t ignore_index,
                                const float* coef_softmax, const float* coef_onehot, int device, void* stream);

// ---- The D3Diff row kernels (docs/design.md §4) ----------------------------------------------------------------
//
// Per contributing row n with target y (ignored rows: target == ignore_index) and time weight w[n]:
//   m = max_k z_k,  l = log Σ_k exp(z_k − m)                 (row statistics, kept apart: m + l is the LSE)
//   CE = (m − z_y) + l                                        (formed from differences, so it keeps its precision
//                                                              at any logit magnitude; lse − z_y would not)
//   u = m + (l − log K),  ℓ = (1 + αw)·CE + [sedd]·αw·(eᵘ − 1 − u)
//   ∂ℓ/∂z_k = (c + e)·softmax_k − c·[k = y],  c = 1 + αw,  e = [sedd]·αw·(eᵘ − 1),  softmax_k = exp((z_k − m) − l)
// The gradient kernels write scale[n]·∂ℓ/∂z. Special values: a NaN or +inf logit in a contributing row makes that
// row's loss, statistics and gradient NaN (as torch's cross-entropy); a −inf logit has probability 0 (a −inf target
// logit gives a loss of +inf and a finite gradient); a row of only −inf is NaN. Ignored rows read nothing: loss and
// statistics 0, gradient row 0. The score term is skipped where αw = 0, so α = 0 is exactly the masked CE.
//
// Logits are rows of a row-major buffer with leading dimension `ld` >= n_cols (a padded buffer whose first n_cols
// columns are the logits); grad has the same layout and may be the logits buffer itself (in place). Row vectors are
// in the accumulation type: fp32, or fp64 for fp64 logits (CPU only).
struct D3DiffOptions {
  double alpha = 0.0;        // weight of the score-entropy term, finite and >= 0
  bool sedd = false;         // score="sedd" (adds φ(u)); false: score="normalized"
  int64_t n_classes = 0;     // K of the full row (log K of u); the columns of a slice are part of it
  int64_t ignore_index = -100;
};

// Per-row terms shared by the CPU and CUDA kernels: the loss and the coefficients (scale·(c + e), scale·c) of
// softmax and one-hot in the gradient.
template <typename A>
struct D3DiffRowTerms {
  A loss, coef_softmax, coef_onehot;
};

template <typename A>
U2A_HD D3DiffRowTerms<A> d3diff_row_terms(A row_max, A log_sum, A target_logit, A w, A alpha, bool sedd, A log_k,
                                          A scale) {
  const A ce = (row_max - target_logit) + log_sum;
  const A aw = alpha * w;
  const A c = A(1) + aw;
  A loss = c * ce;
  A e = A(0);
  if (sedd && aw != A(0)) {
    const A u = row_max + (log_sum - log_k);
    const A em1 = expm1(u);
    loss += aw * (em1 - u);
    e = aw * em1;
  }
  return {loss, scale * (c + e), scale * c};
}

// Forward over whole rows (n_cols == opts.n_classes): loss[n], row_max[n], log_sum[n]. With `grad` non-null the
// rows are also turned into row_scale[n]·∂ℓ/∂z (row_scale is then required); grad may alias logits.
// Targets outside [0, K) that are not ignore_index: an error on the CPU (nothing written); on CUDA the row gets
// NaN statistics and loss and a zero gradient row (raising would need a host synchronisation).
Status d3diff_rows_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                       const int64_t* target, const void* row_weight, const void* row_scale, const D3DiffOptions& opts,
                       void* loss, void* row_max, void* log_sum);
// Gradient from stored statistics over a column slice: the buffer holds columns [col0, col0 + n_cols) of rows
// whose full width is opts.n_classes. grad = row_scale[n]·∂ℓ/∂z over the slice (the one-hot only where the target
// falls in it); grad may alias logits.
Status d3diff_rows_grad_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                            int64_t col0, const int64_t* target, const void* row_weight, const void* row_max,
                            const void* log_sum, const void* row_scale, const D3DiffOptions& opts);
Status d3diff_rows_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                        const int64_t* target, const float* row_weight, const float* row_scale,
                        const D3DiffOptions& opts, float* loss, float* row_max, float* log_sum, int device,
                        void* stream);
Status d3diff_rows_grad_cuda(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                             int64_t col0, const int64_t* target, const float* row_weight, const float* row_max,
                             const float* log_sum, const float* row_scale, const D3DiffOptions& opts, int device,
                             void* stream);

// Argument checks shared by both devices (no data is read).
Status check_d3diff_args(int64_t n_rows, int64_t n_cols, int64_t ld, int64_t col0, const D3DiffOptions& opts,
                         const char* what);

}  // namespace loss
}  // namespace unif2ace
