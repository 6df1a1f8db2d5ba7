// Python entry points of the loss family.
#include <cmath>
#include <string>

#include "bind_util.h"
#include "unif2ace/loss.h"

namespace unif2ace {
namespace bind {

namespace {

void check_rows(const View& logits, const View& target) {
  expect_kind(logits, {Kind::kFloat32, Kind::kBFloat16, Kind::kFloat16, Kind::kFloat64});
  expect_dim(logits, 2);
  expect_kind(target, {Kind::kInt64});
  expect_shape(target, {logits.size(0)});
  expect_same_device(logits, target);
  if (logits.size(1) == 0) fail("logits: the number of classes must be positive");
}

void check_row_vector(const View& logits, const View& v) {
  expect_kind(v, {logits.acc_kind()});
  expect_shape(v, {logits.size(0)});
  expect_same_device(logits, v);
}

void row_lse_target(const py::capsule& logits_c, const py::capsule& target_c, int64_t ignore_index,
                    const py::capsule& lse_c, const py::capsule& target_logit_c, uintptr_t stream) {
  View logits = view(logits_c, "logits"), target = view(target_c, "target");
  View lse = view(lse_c, "lse"), target_logit = view(target_logit_c, "target_logit");
  check_rows(logits, target);
  check_row_vector(logits, lse);
  check_row_vector(logits, target_logit);
  const int64_t n = logits.size(0), k = logits.size(1);
  run_entry(
      "row_lse_target", logits,
      [&] {
        return loss::row_lse_target_cpu(logits.data, logits.float_dtype(), n, k, target.ptr<int64_t>(),
                                        ignore_index, lse.data, target_logit.data);
      },
      [&] {
        return loss::row_lse_target_cuda(logits.data, logits.float_dtype(), n, k, target.ptr<int64_t>(), ignore_index,
                                         lse.ptr<float>(), target_logit.ptr<float>(), logits.device,
                                         reinterpret_cast<void*>(stream));
      });
}

void softmax_onehot_grad(const py::capsule& logits_c, const py::capsule& grad_c, const py::capsule& lse_c,
                         const py::capsule& target_c, int64_t ignore_index, const py::capsule& coef_softmax_c,
                         const py::capsule& coef_onehot_c, uintptr_t stream) {
  View logits = view(logits_c, "logits"), grad = view(grad_c, "grad"), lse = view(lse_c, "lse");
  View target = view(target_c, "target");
  View coef_softmax = view(coef_softmax_c, "coef_softmax"), coef_onehot = view(coef_onehot_c, "coef_onehot");
  check_rows(logits, target);
  if (grad.kind != logits.kind) fail("grad: must have the dtype of logits");
  expect_shape(grad, logits.shape);
  expect_same_device(logits, grad);
  check_row_vector(logits, lse);
  check_row_vector(logits, coef_softmax);
  check_row_vector(logits, coef_onehot);
  const int64_t n = logits.size(0), k = logits.size(1);
  run_entry(
      "softmax_onehot_grad", logits,
      [&] {
        return loss::softmax_onehot_grad_cpu(logits.data, grad.data, logits.float_dtype(), n, k, lse.data,
                                             target.ptr<int64_t>(), ignore_index, coef_softmax.data,
                                             coef_onehot.data);
      },
      [&] {
        return loss::softmax_onehot_grad_cuda(logits.data, grad.data, logits.float_dtype(), n, k, lse.ptr<float>(),
                                              target.ptr<int64_t>(), ignore_index, coef_softmax.ptr<float>(),
                                              coef_onehot.ptr<float>(), logits.device,
                                              reinterpret_cast<void*>(stream));
      });
}

// Logits of the D3Diff row kernels: a contiguous [rows, ld] buffer whose first n_cols columns are used.
void check_buffer(const View& logits, const View& target, int64_t n_cols) {
  check_rows(logits, target);
  if (n_cols <= 0 || n_cols > logits.size(1))
    fail("n_cols: must lie in [1, " + std::to_string(logits.size(1)) + "] (the buffer's row length), got " +
         std::to_string(n_cols));
}

void check_grad_buffer(const View& logits, const View& grad) {
  if (grad.kind != logits.kind) fail("grad: must have the dtype of logits");
  expect_shape(grad, logits.shape);
  expect_same_device(logits, grad);
}

loss::D3DiffOptions d3diff_options(double alpha, bool sedd, int64_t n_classes, int64_t ignore_index) {
  if (!(alpha >= 0.0) || !std::isfinite(alpha)) fail("alpha: must be a finite number >= 0");
  loss::D3DiffOptions opts;
  opts.alpha = alpha;
  opts.sedd = sedd;
  opts.n_classes = n_classes;
  opts.ignore_index = ignore_index;
  return opts;
}

void d3diff_rows(const py::capsule& logits_c, int64_t n_cols, const py::capsule& target_c, int64_t ignore_index,
                 const py::capsule& row_weight_c, double alpha, bool sedd, const py::object& row_scale_o,
                 const py::capsule& loss_c, const py::capsule& row_max_c, const py::capsule& log_sum_c,
                 const py::object& grad_o, uintptr_t stream) {
  View logits = view(logits_c, "logits"), target = view(target_c, "target");
  View row_weight = view(row_weight_c, "row_weight"), loss_v = view(loss_c, "loss");
  View row_max = view(row_max_c, "row_max"), log_sum = view(log_sum_c, "log_sum");
  check_buffer(logits, target, n_cols);
  for (const View* v : {&row_weight, &loss_v, &row_max, &log_sum}) check_row_vector(logits, *v);
  View row_scale, grad;
  const bool with_grad = !grad_o.is_none();
  if (with_grad) {
    if (row_scale_o.is_none()) fail("row_scale: needed when a gradient is written");
    grad = view(grad_o.cast<py::capsule>(), "grad");
    check_grad_buffer(logits, grad);
  }
  if (!row_scale_o.is_none()) {
    row_scale = view(row_scale_o.cast<py::capsule>(), "row_scale");
    check_row_vector(logits, row_scale);
  }
  const loss::D3DiffOptions opts = d3diff_options(alpha, sedd, n_cols, ignore_index);
  const int64_t n = logits.size(0), ld = logits.size(1);
  void* grad_data = with_grad ? grad.data : nullptr;
  run_entry(
      "d3diff_rows", logits,
      [&] {
        return loss::d3diff_rows_cpu(logits.data, grad_data, logits.float_dtype(), n, n_cols, ld,
                                     target.ptr<int64_t>(), row_weight.data, row_scale.data, opts, loss_v.data,
                                     row_max.data, log_sum.data);
      },
      [&] {
        return loss::d3diff_rows_cuda(logits.data, grad_data, logits.float_dtype(), n, n_cols, ld,
                                      target.ptr<int64_t>(), row_weight.ptr<float>(), row_scale.ptr<float>(), opts,
                                      loss_v.ptr<float>(), row_max.ptr<float>(), log_sum.ptr<float>(), logits.device,
                                      reinterpret_cast<void*>(stream));
      });
}

void d3diff_rows_grad(const py::capsule& logits_c, int64_t n_cols, int64_t col0, int64_t n_classes,
                      const py::capsule& target_c, int64_t ignore_index, const py::capsule& row_weight_c, double alpha,
                      bool sedd, const py::capsule& row_max_c, const py::capsule& log_sum_c,
                      const py::capsule& row_scale_c, const py::capsule& grad_c, uintptr_t stream) {
  View logits = view(logits_c, "logits"), target = view(target_c, "target");
  View row_weight = view(row_weight_c, "row_weight"), row_max = view(row_max_c, "row_max");
  View log_sum = view(log_sum_c, "log_sum"), row_scale = view(row_scale_c, "row_scale");
  View grad = view(grad_c, "grad");
  check_buffer(logits, target, n_cols);
  for (const View* v : {&row_weight, &row_max, &log_sum, &row_scale}) check_row_vector(logits, *v);
  check_grad_buffer(logits, grad);
  if (col0 < 0 || n_classes < n_cols || col0 > n_classes - n_cols)
    fail("col0: the columns [col0, col0 + n_cols) must lie in [0, n_classes)");
  const loss::D3DiffOptions opts = d3diff_options(alpha, sedd, n_classes, ignore_index);
  const int64_t n = logits.size(0), ld = logits.size(1);
  run_entry(
      "d3diff_rows_grad", logits,
      [&] {
        return loss::d3diff_rows_grad_cpu(logits.data, grad.data, logits.float_dtype(), n, n_cols, ld, col0,
                                          target.ptr<int64_t>(), row_weight.data, row_max.data, log_sum.data,
                                          row_scale.data, opts);
      },
      [&] {
        return loss::d3diff_rows_grad_cuda(logits.data, grad.data, logits.float_dtype(), n, n_cols, ld, col0,
                                           target.ptr<int64_t>(), row_weight.ptr<float>(), row_max.ptr<float>(),
                                           log_sum.ptr<float>(), row_scale.ptr<float>(), opts, logits.device,
                                           reinterpret_cast<void*>(stream));
      });
}

}  // namespace

void bind_loss(py::module_& m) {
  m.def("d3diff_rows", &d3diff_rows, py::arg("logits"), py::arg("n_cols"), py::arg("target"),
        py::arg("ignore_index"), py::arg("row_weight"), py::arg("alpha"), py::arg("sedd"), py::arg("row_scale"),
        py::arg("loss"), py::arg("row_max"), py::arg("log_sum"), py::arg("grad"), py::arg("stream") = 0,
        "D3Diff loss and row statistics (max, log-sum) of the first n_cols columns of logits[rows, ld]; with grad, "
        "row_scale * dloss/dlogits written there (grad may alias logits).");
  m.def("d3diff_rows_grad", &d3diff_rows_grad, py::arg("logits"), py::arg("n_cols"), py::arg("col0"),
        py::arg("n_classes"), py::arg("target"), py::arg("ignore_index"), py::arg("row_weight"), py::arg("alpha"),
        py::arg("sedd"), py::arg("row_max"), py::arg("log_sum"), py::arg("row_scale"), py::arg("grad"),
        py::arg("stream") = 0,
        "row_scale * dloss/dlogits of the column slice [col0, col0 + n_cols) held in the first n_cols columns of "
        "logits[rows, ld], from stored row statistics; grad may alias logits.");
  m.def("row_lse_target", &row_lse_target, py::arg("logits"), py::arg("target"), py::arg("ignore_index"),
        py::arg("lse"), py::arg("target_logit"), py::arg("stream") = 0,
        "Per-row log-sum-exp and target logit of logits[N, K] into fp32 lse[N], target_logit[N].");
  m.def("softmax_onehot_grad", &softmax_onehot_grad, py::arg("logits"), py::arg("grad"), py::arg("lse"),
        py::arg("target"), py::arg("ignore_index"), py::arg("coef_softmax"), py::arg("coef_onehot"),
        py::arg("stream") = 0,
        "grad = coef_softmax * softmax(logits) - coef_onehot * onehot(target), rowwise; grad may alias logits.");
}

}  // namespace bind
}  // namespace unif2ace
