// CPU D3Diff row kernels: the loss and row statistics of whole rows (optionally turning them into their gradient in
// place), and the gradient of a column slice from stored statistics. One row per OpenMP iteration, so results do not
// depend on the thread count. A row is read twice (max, then the sum of exponentials): rows are at most a few hundred
// KiB, so the second read comes from cache.
#include <cmath>
#include <limits>
#include <string>

#include "unif2ace/cpu_math.h"
#include "unif2ace/loss.h"

namespace unif2ace {
namespace loss {

Status check_d3diff_args(int64_t n_rows, int64_t n_cols, int64_t ld, int64_t col0, const D3DiffOptions& opts,
                         const char* what) {
  const std::string name(what);
  if (n_rows < 0) return Status::Invalid(name + ": n_rows must be >= 0");
  if (n_cols <= 0) return Status::Invalid(name + ": the number of classes must be positive");
  if (ld < n_cols) return Status::Invalid(name + ": the leading dimension must be >= the number of columns");
  if (opts.n_classes <= 0 || col0 < 0 || col0 > opts.n_classes - n_cols)
    return Status::Invalid(name + ": the columns [col0, col0 + n_cols) must lie in [0, n_classes)");
  if (!(opts.alpha >= 0.0) || !std::isfinite(opts.alpha))
    return Status::Invalid(name + ": alpha must be a finite number >= 0");
  return Status::Ok();
}

namespace {

Status check_targets(const int64_t* target, int64_t n_rows, int64_t n_classes, int64_t ignore_index,
                     const char* what) {
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = target[n];
    if (y != ignore_index && (y < 0 || y >= n_classes)) {
      return Status::Invalid(std::string(what) + ": target[" + std::to_string(n) + "] = " + std::to_string(y) +
                             " is outside [0, " + std::to_string(n_classes) + ") and is not ignore_index (" +
                             std::to_string(ignore_index) + ")");
    }
  }
  return Status::Ok();
}

template <typename T, typename A>
void zero_row(T* out, int64_t n_cols) {
  const T zero = narrow<T>(A(0));
  for (int64_t k = 0; k < n_cols; ++k) out[k] = zero;
}

// out[k] = a·exp((z_k − m) − l), then the one-hot term at column `y_local` (−1: not in this slice). `z_y` is the
// target's logit read before an in-place pass overwrites it.
template <typename T, typename A>
void write_grad_row(const T* row, T* out, int64_t n_cols, A m, A l, A a, A b, int64_t y_local, A z_y) {
#pragma omp simd
  for (int64_t k = 0; k < n_cols; ++k) out[k] = narrow<T>(a * cpu::exp_acc((widen(row[k]) - m) - l));
  if (y_local >= 0) out[y_local] = narrow<T>(a * cpu::exp_acc((z_y - m) - l) - b);
}

template <typename T, typename A = typename Acc<T>::type>
void rows_forward(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, int64_t ld, const int64_t* target,
                  const A* row_weight, const A* row_scale, const D3DiffOptions& opts, A* loss, A* row_max,
                  A* log_sum) {
  const A alpha = static_cast<A>(opts.alpha);
  const A log_k = std::log(static_cast<A>(opts.n_classes));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = target[n];
    const T* row = logits + n * ld;
    if (y == opts.ignore_index) {
      loss[n] = row_max[n] = log_sum[n] = A(0);
      if (grad != nullptr) zero_row<T, A>(grad + n * ld, n_cols);
      continue;
    }
    A m = -std::numeric_limits<A>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t k = 0; k < n_cols; ++k) m = std::fmax(m, widen(row[k]));
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n_cols; ++k) s += cpu::exp_acc(widen(row[k]) - m);
    const A l = std::log(s);
    const A z_y = widen(row[y]);
    const A scale = row_scale != nullptr ? row_scale[n] : A(0);
    const D3DiffRowTerms<A> t = d3diff_row_terms<A>(m, l, z_y, row_weight[n], alpha, opts.sedd, log_k, scale);
    loss[n] = t.loss;
    row_max[n] = m;
    log_sum[n] = l;
    if (grad != nullptr) write_grad_row<T, A>(row, grad + n * ld, n_cols, m, l, t.coef_softmax, t.coef_onehot, y, z_y);
  }
}

template <typename T, typename A = typename Acc<T>::type>
void rows_grad(const T* logits, T* grad, int64_t n_rows, int64_t n_cols, int64_t ld, int64_t col0,
               const int64_t* target, const A* row_weight, const A* row_max, const A* log_sum, const A* row_scale,
               const D3DiffOptions& opts) {
  const A alpha = static_cast<A>(opts.alpha);
  const A log_k = std::log(static_cast<A>(opts.n_classes));
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t y = target[n];
    const T* row = logits + n * ld;
    T* out = grad + n * ld;
    if (y == opts.ignore_index) {
      zero_row<T, A>(out, n_cols);
      continue;
    }
    const int64_t y_local = (y >= col0 && y < col0 + n_cols) ? y - col0 : -1;
    const A z_y = y_local >= 0 ? widen(row[y_local]) : A(0);
    // The loss is not needed here: the target logit only enters it, not the coefficients.
    const D3DiffRowTerms<A> t =
        d3diff_row_terms<A>(row_max[n], log_sum[n], A(0), row_weight[n], alpha, opts.sedd, log_k, row_scale[n]);
    write_grad_row<T, A>(row, out, n_cols, row_max[n], log_sum[n], t.coef_softmax, t.coef_onehot, y_local, z_y);
  }
}

}  // namespace

Status d3diff_rows_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                       const int64_t* target, const void* row_weight, const void* row_scale, const D3DiffOptions& opts,
                       void* loss, void* row_max, void* log_sum) {
  Status s = check_d3diff_args(n_rows, n_cols, ld, 0, opts, "d3diff_rows");
  if (!s.ok()) return s;
  if (n_cols != opts.n_classes) return Status::Invalid("d3diff_rows: whole rows are needed (n_cols == n_classes)");
  if (grad != nullptr && row_scale == nullptr) return Status::Invalid("d3diff_rows: a gradient needs row_scale");
  s = check_targets(target, n_rows, n_cols, opts.ignore_index, "d3diff_rows");
  if (!s.ok()) return s;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    rows_forward<T>(static_cast<const T*>(logits), static_cast<T*>(grad), n_rows, n_cols, ld, target,
                    static_cast<const A*>(row_weight), static_cast<const A*>(row_scale), opts, static_cast<A*>(loss),
                    static_cast<A*>(row_max), static_cast<A*>(log_sum));
  });
  return Status::Ok();
}

Status d3diff_rows_grad_cpu(const void* logits, void* grad, DType dtype, int64_t n_rows, int64_t n_cols, int64_t ld,
                            int64_t col0, const int64_t* target, const void* row_weight, const void* row_max,
                            const void* log_sum, const void* row_scale, const D3DiffOptions& opts) {
  Status s = check_d3diff_args(n_rows, n_cols, ld, col0, opts, "d3diff_rows_grad");
  if (!s.ok()) return s;
  s = check_targets(target, n_rows, opts.n_classes, opts.ignore_index, "d3diff_rows_grad");
  if (!s.ok()) return s;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    rows_grad<T>(static_cast<const T*>(logits), static_cast<T*>(grad), n_rows, n_cols, ld, col0, target,
                 static_cast<const A*>(row_weight), static_cast<const A*>(row_max), static_cast<const A*>(log_sum),
                 static_cast<const A*>(row_scale), opts);
  });
  return Status::Ok();
}

}  // namespace loss
}  // namespace unif2ace
