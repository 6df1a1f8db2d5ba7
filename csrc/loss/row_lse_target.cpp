// CPU row kernels of the D3Diff loss: per-row log-sum-exp + target logit, and the (optionally in-place)
// coefficient * softmax - coefficient * one-hot gradient. One row per OpenMP iteration, so a row's result
// does not depend on the thread count.
#include <cmath>
#include <limits>
#include <string>

#include "unif2ace/cpu_math.h"
#include "unif2ace/loss.h"

namespace unif2ace {
namespace loss::U2A_CPU_NS {  // one copy per CPU instruction-set level (docs/cpp.md)
namespace {

Status check_targets(const int64_t* target, int64_t n_rows, int64_t n_cols, int64_t ignore_index) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = target[n];
    if (y != ignore_index && (y < 0 || y >= n_cols)) {
      return Status::Invalid("target[" + std::to_string(n) + "] = " + std::to_string(y) + " is outside [0, " +
                             std::to_string(n_cols) + ") and is not ignore_index (" + std::to_string(ignore_index) +
                             ")");
    }
  }
  return Status::Ok();
}

template <typename T, typename A = typename Acc<T>::type>
A row_lse(const T* row, int64_t n_cols) {
  A row_max = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : row_max)
  for (int64_t k = 0; k < n_cols; ++k) row_max = std::fmax(row_max, widen(row[k]));
  if (std::isinf(row_max)) return row_max;  // all -inf, or a +inf entry
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n_cols; ++k) sum += cpu::exp_acc(widen(row[k]) - row_max);
  return row_max + std::log(sum);
}

template <typename T, typename A = typename Acc<T>::type>
void lse_target_rows(const T* logits, int64_t n_rows, int64_t n_cols, const int64_t* target, int64_t ignore_index,
                     A* lse, A* target_logit) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = target[n];
    if (y == ignore_index) {
      lse[n] = 0;
      target_logit[n] = 0;
      continue;
    }
    const T* row = logits + n * n_cols;
    lse[n] = row_lse(row, n_cols);
    target_logit[n] = widen(row[y]);
  }
}

template <typename T, typename A = typename Acc<T>::type>
void grad_rows(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, const A* lse, const int64_t* target,
               int64_t ignore_index, const A* coef_softmax, const A* coef_onehot) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_rows; ++n) {
    const T* row = logits + n * n_cols;
    T* out = grad + n * n_cols;
    const int64_t y = target[n];
    if (y == ignore_index) {
      const T zero = narrow<T>(A(0));
      for (int64_t k = 0; k < n_cols; ++k) out[k] = zero;
      continue;
    }
    const A row_lse_value = lse[n];
    const A a = coef_softmax[n];
    const A target_value = widen(row[y]);  // read before an in-place pass overwrites it
#pragma omp simd
    for (int64_t k = 0; k < n_cols; ++k) out[k] = narrow<T>(a * cpu::exp_acc(widen(row[k]) - row_lse_value));
    out[y] = narrow<T>(a * cpu::exp_acc(target_value - row_lse_value) - coef_onehot[n]);
  }
}

}  // namespace

Status row_lse_target_cpu(const void* logits, DType dtype, int64_t n_rows, int64_t n_cols, const int64_t* target,
                          int64_t ignore_index, void* lse, void* target_logit) {
  if (n_rows < 0 || n_cols <= 0) return Status::Invalid("row_lse_target: need n_rows >= 0 and n_cols > 0");
  Status s = check_targets(target, n_rows, n_cols, ignore_index);
  if (!s.ok()) return s;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    lse_target_rows(static_cast<const T*>(logits), n_rows, n_cols, target, ignore_index, static_cast<A*>(lse),
                    static_cast<A*>(target_logit));
  });
  return Status::Ok();
}

Status softmax_onehot_grad_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols,
                               const void* lse, const int64_t* target, int64_t ignore_index,
                               const void* coef_softmax, const void* coef_onehot) {
  if (n_rows < 0 || n_cols <= 0) return Status::Invalid("softmax_onehot_grad: need n_rows >= 0 and n_cols > 0");
  Status s = check_targets(target, n_rows, n_cols, ignore_index);
  if (!s.ok()) return s;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    grad_rows(static_cast<const T*>(logits), static_cast<T*>(grad), n_rows, n_cols, static_cast<const A*>(lse),
              target, ignore_index, static_cast<const A*>(coef_softmax), static_cast<const A*>(coef_onehot));
  });
  return Status::Ok();
}

}  // namespace loss::U2A_CPU_NS
}  // namespace unif2ace
