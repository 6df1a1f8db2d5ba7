// Row kernels under the D3Diff loss (DESIGN section 4). The loss only needs, per row of logits z[N, K],
// the log-sum-exp and the target logit; its gradient with respect to the logits is a per-row
// coefficient times the softmax minus a per-row coefficient times the one-hot of the target.
//
// Row vectors (lse, target_logit, coefficients) are in the accumulation type: fp32, or fp64 for fp64
// logits (CPU only).
#pragma once

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

}  // namespace loss
}  // namespace unif2ace
