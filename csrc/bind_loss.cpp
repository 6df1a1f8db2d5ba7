// Python entry points of the loss family.
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
  if (logits.cuda) {
#ifdef UNIF2ACE_WITH_CUDA
    py::gil_scoped_release release;
    raise_if_error(loss::row_lse_target_cuda(logits.data, logits.float_dtype(), n, k, target.ptr<int64_t>(),
                                             ignore_index, lse.ptr<float>(), target_logit.ptr<float>(),
                                             logits.device, reinterpret_cast<void*>(stream)));
    return;
#else
    no_cuda("row_lse_target");
#endif
  }
  Status s;
  {
    py::gil_scoped_release release;
    s = loss::row_lse_target_cpu(logits.data, logits.float_dtype(), n, k, target.ptr<int64_t>(), ignore_index,
                                 lse.data, target_logit.data);
  }
  raise_if_error(s);
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
  if (logits.cuda) {
#ifdef UNIF2ACE_WITH_CUDA
    py::gil_scoped_release release;
    raise_if_error(loss::softmax_onehot_grad_cuda(logits.data, grad.data, logits.float_dtype(), n, k,
                                                  lse.ptr<float>(), target.ptr<int64_t>(), ignore_index,
                                                  coef_softmax.ptr<float>(), coef_onehot.ptr<float>(),
                                                  logits.device, reinterpret_cast<void*>(stream)));
    return;
#else
    no_cuda("softmax_onehot_grad");
#endif
  }
  Status s;
  {
    py::gil_scoped_release release;
    s = loss::softmax_onehot_grad_cpu(logits.data, grad.data, logits.float_dtype(), n, k, lse.data,
                                      target.ptr<int64_t>(), ignore_index, coef_softmax.data, coef_onehot.data);
  }
  raise_if_error(s);
}

}  // namespace

void bind_loss(py::module_& m) {
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
