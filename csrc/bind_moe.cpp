// Python entry points of the MoE family. Every output and workspace arrives allocated; shapes, dtypes and
// devices are checked here with messages that name the argument.
#include <optional>

#include "bind_util.h"
#include "unif2ace/moe.h"

namespace unif2ace {
namespace bind {

namespace {

std::optional<View> opt_view(const py::object& o, const char* name) {
  if (o.is_none()) return std::nullopt;
  return view(o.cast<py::capsule>(), name);
}

void* opt_data(const std::optional<View>& v) { return v ? v->data : nullptr; }

// Block sizes of the CUDA gating and sort kernels, which size their workspaces (the CUDA build's values; a build
// without CUDA reports the same defaults).
int64_t gate_block_tokens() {
#ifdef UNIF2ACE_WITH_CUDA
  return moe::gate_block_tokens();
#else
  return 256;
#endif
}

int64_t sort_block_slots() {
#ifdef UNIF2ACE_WITH_CUDA
  return moe::sort_block_slots();
#else
  return 256;
#endif
}

const std::initializer_list<Kind> kFloatKinds = {Kind::kFloat32, Kind::kBFloat16, Kind::kFloat16, Kind::kFloat64};

void check_acc_vector(const View& ref, const View& v, const std::vector<int64_t>& shape) {
  expect_kind(v, {ref.acc_kind()});
  expect_shape(v, shape);
  expect_same_device(ref, v);
}

void check_int64(const View& ref, const View& v, const std::vector<int64_t>& shape) {
  expect_kind(v, {Kind::kInt64});
  expect_shape(v, shape);
  expect_same_device(ref, v);
}

struct GateArgs {
  View logits, group_ids;
  std::optional<View> token_mask;
  int64_t n_tokens = 0, n_groups = 0, n_experts = 0, top_k = 0;
};

GateArgs gate_args(const py::capsule& logits_c, const py::capsule& group_ids_c, const py::object& token_mask_c,
                   int64_t num_groups, int64_t top_k) {
  GateArgs a{view(logits_c, "router_logits"), view(group_ids_c, "group_ids"), opt_view(token_mask_c, "token_mask")};
  expect_kind(a.logits, kFloatKinds);
  expect_dim(a.logits, 2);
  if (num_groups <= 0) fail("num_groups: must be positive");
  if (a.logits.size(1) % num_groups != 0 || a.logits.size(1) == 0)
    fail("router_logits: the number of columns (" + std::to_string(a.logits.size(1)) +
         ") must be a positive multiple of num_groups (" + std::to_string(num_groups) + ")");
  a.n_tokens = a.logits.size(0);
  a.n_groups = num_groups;
  a.n_experts = a.logits.size(1) / num_groups;
  a.top_k = top_k;
  if (top_k <= 0 || top_k > a.n_experts)
    fail("top_k: must lie in [1, " + std::to_string(a.n_experts) + "], got " + std::to_string(top_k));
  check_int64(a.logits, a.group_ids, {a.n_tokens});
  if (a.token_mask) {
    expect_kind(*a.token_mask, {Kind::kBool});
    expect_shape(*a.token_mask, {a.n_tokens});
    expect_same_device(a.logits, *a.token_mask);
  }
  return a;
}

void gate_forward(const py::capsule& logits_c, const py::capsule& group_ids_c, const py::object& token_mask_c,
                  int64_t num_groups, int64_t top_k, bool renormalize, const py::capsule& gates_c,
                  const py::capsule& expert_ids_c, const py::capsule& expert_counts_c,
                  const py::capsule& group_counts_c, const py::capsule& prob_mean_c, const py::object& ws_probs_c,
                  const py::object& ws_counts_c, const py::object& ws_groups_c, uintptr_t stream) {
  GateArgs a = gate_args(logits_c, group_ids_c, token_mask_c, num_groups, top_k);
  View gates = view(gates_c, "gates"), ids = view(expert_ids_c, "expert_ids");
  View counts = view(expert_counts_c, "expert_counts"), groups = view(group_counts_c, "group_counts");
  View prob_mean = view(prob_mean_c, "router_prob_mean");
  const int64_t ne = a.n_groups * a.n_experts;
  check_acc_vector(a.logits, gates, {a.n_tokens, top_k});
  check_int64(a.logits, ids, {a.n_tokens, top_k});
  check_int64(a.logits, counts, {ne});
  check_int64(a.logits, groups, {a.n_groups});
  check_acc_vector(a.logits, prob_mean, {ne});
  const uint8_t* mask = static_cast<const uint8_t*>(opt_data(a.token_mask));
  std::optional<View> wp, wc, wg;  // the CUDA kernel's workspaces
  if (a.logits.cuda) {
    wp = opt_view(ws_probs_c, "workspace_probs"), wc = opt_view(ws_counts_c, "workspace_counts");
    wg = opt_view(ws_groups_c, "workspace_groups");
    if (!wp || !wc || !wg) fail("moe_gate: the CUDA kernel needs its three workspaces");
    const int64_t nb = (a.n_tokens + gate_block_tokens() - 1) / gate_block_tokens();
    check_acc_vector(a.logits, *wp, {nb, ne});
    check_int64(a.logits, *wc, {nb, ne});
    check_int64(a.logits, *wg, {nb, a.n_groups});
  }
  run_entry(
      "moe_gate", a.logits,
      [&] {
        return moe::gate_forward_cpu(a.logits.data, a.logits.float_dtype(), a.n_tokens, a.n_groups, a.n_experts,
                                     top_k, a.group_ids.ptr<int64_t>(), mask, renormalize, gates.data,
                                     ids.ptr<int64_t>(), counts.ptr<int64_t>(), groups.ptr<int64_t>(), prob_mean.data);
      },
      [&] {
        return moe::gate_forward_cuda(a.logits.data, a.logits.float_dtype(), a.n_tokens, a.n_groups, a.n_experts,
                                      top_k, a.group_ids.ptr<int64_t>(), mask, renormalize, gates.ptr<float>(),
                                      ids.ptr<int64_t>(), counts.ptr<int64_t>(), groups.ptr<int64_t>(),
                                      prob_mean.ptr<float>(), wp->ptr<float>(), wc->ptr<int64_t>(),
                                      wg->ptr<int64_t>(), a.logits.device, reinterpret_cast<void*>(stream));
      });
}

void gate_backward(const py::capsule& logits_c, const py::capsule& group_ids_c, const py::object& token_mask_c,
                   int64_t num_groups, int64_t top_k, bool renormalize, const py::capsule& expert_ids_c,
                   const py::capsule& group_counts_c, const py::object& grad_gates_c,
                   const py::object& grad_prob_mean_c, const py::capsule& grad_logits_c, uintptr_t stream) {
  GateArgs a = gate_args(logits_c, group_ids_c, token_mask_c, num_groups, top_k);
  View ids = view(expert_ids_c, "expert_ids"), groups = view(group_counts_c, "group_counts");
  View grad_logits = view(grad_logits_c, "grad_logits");
  auto gg = opt_view(grad_gates_c, "grad_gates"), gp = opt_view(grad_prob_mean_c, "grad_router_prob_mean");
  const int64_t ne = a.n_groups * a.n_experts;
  check_int64(a.logits, ids, {a.n_tokens, top_k});
  check_int64(a.logits, groups, {a.n_groups});
  if (gg) check_acc_vector(a.logits, *gg, {a.n_tokens, top_k});
  if (gp) check_acc_vector(a.logits, *gp, {ne});
  if (grad_logits.kind != a.logits.kind) fail("grad_logits: must have the dtype of router_logits");
  expect_shape(grad_logits, a.logits.shape);
  expect_same_device(a.logits, grad_logits);
  const uint8_t* mask = static_cast<const uint8_t*>(opt_data(a.token_mask));
  run_entry(
      "moe_gate backward", a.logits,
      [&] {
        return moe::gate_backward_cpu(a.logits.data, a.logits.float_dtype(), a.n_tokens, a.n_groups, a.n_experts,
                                      top_k, a.group_ids.ptr<int64_t>(), mask, renormalize, ids.ptr<int64_t>(),
                                      groups.ptr<int64_t>(), opt_data(gg), opt_data(gp), grad_logits.data);
      },
      [&] {
        return moe::gate_backward_cuda(a.logits.data, a.logits.float_dtype(), a.n_tokens, a.n_groups, a.n_experts,
                                       top_k, a.group_ids.ptr<int64_t>(), mask, renormalize, ids.ptr<int64_t>(),
                                       groups.ptr<int64_t>(), static_cast<const float*>(opt_data(gg)),
                                       static_cast<const float*>(opt_data(gp)), grad_logits.data, a.logits.device,
                                       reinterpret_cast<void*>(stream));
      });
}

void sort_slots(const py::capsule& expert_ids_c, int64_t num_experts, const py::capsule& offsets_c,
                const py::capsule& sorted_slot_c, const py::object& ws_c, uintptr_t stream) {
  View ids = view(expert_ids_c, "expert_ids"), offsets = view(offsets_c, "expert_offsets");
  View sorted = view(sorted_slot_c, "sorted_slot");
  expect_kind(ids, {Kind::kInt64});
  if (num_experts <= 0) fail("num_experts: must be positive");
  const int64_t n = ids.numel();
  check_int64(ids, offsets, {num_experts + 1});
  check_int64(ids, sorted, {n});
  std::optional<View> ws;  // the CUDA sort's workspace
  if (ids.cuda) {
    ws = opt_view(ws_c, "workspace");
    if (!ws) fail("moe_dispatch: the CUDA sort needs its workspace");
    const int64_t nb = (n + sort_block_slots() - 1) / sort_block_slots();
    check_int64(ids, *ws, {nb, num_experts + 1});
  }
  run_entry(
      "moe_dispatch", ids,
      [&] {
        return moe::sort_slots_cpu(ids.ptr<int64_t>(), n, num_experts, offsets.ptr<int64_t>(), sorted.ptr<int64_t>());
      },
      [&] {
        return moe::sort_slots_cuda(ids.ptr<int64_t>(), n, num_experts, offsets.ptr<int64_t>(), sorted.ptr<int64_t>(),
                                    ws->ptr<int64_t>(), ids.device, reinterpret_cast<void*>(stream));
      });
}

void invert_permutation(const py::capsule& sorted_slot_c, const py::capsule& slot_pos_c, uintptr_t stream) {
  View sorted = view(sorted_slot_c, "sorted_slot"), pos = view(slot_pos_c, "slot_pos");
  expect_kind(sorted, {Kind::kInt64});
  expect_dim(sorted, 1);
  check_int64(sorted, pos, sorted.shape);
  run_entry(
      "moe_combine", sorted,
      [&] {
        return moe::invert_permutation_cpu(sorted.ptr<int64_t>(), sorted.numel(), pos.ptr<int64_t>());
      },
      [&] {
        return moe::invert_permutation_cuda(sorted.ptr<int64_t>(), sorted.numel(), pos.ptr<int64_t>(), sorted.device,
                                            reinterpret_cast<void*>(stream));
      });
}

void permute_rows(const py::capsule& src_c, const py::capsule& sorted_slot_c, int64_t top_k,
                  const py::capsule& out_c, uintptr_t stream) {
  View src = view(src_c, "x"), sorted = view(sorted_slot_c, "sorted_slot"), out = view(out_c, "x_sorted");
  expect_kind(src, kFloatKinds);
  expect_dim(src, 2);
  expect_kind(sorted, {Kind::kInt64});
  expect_dim(sorted, 1);
  expect_same_device(src, sorted);
  if (top_k <= 0) fail("top_k: must be positive");
  if (out.kind != src.kind) fail("x_sorted: must have the dtype of x");
  expect_shape(out, {sorted.size(0), src.size(1)});
  expect_same_device(src, out);
  run_entry(
      "moe_dispatch", src,
      [&] {
        return moe::permute_rows_cpu(src.data, src.float_dtype(), src.size(0), src.size(1), top_k,
                                     sorted.ptr<int64_t>(), sorted.size(0), out.data);
      },
      [&] {
        return moe::permute_rows_cuda(src.data, src.float_dtype(), src.size(0), src.size(1), top_k,
                                      sorted.ptr<int64_t>(), sorted.size(0), out.data, src.device,
                                      reinterpret_cast<void*>(stream));
      });
}

void unpermute_sum(const py::capsule& rows_c, const py::capsule& slot_pos_c, const py::object& weights_c,
                   int64_t top_k, const py::capsule& out_c, uintptr_t stream) {
  View rows = view(rows_c, "y_sorted"), pos = view(slot_pos_c, "slot_pos"), out = view(out_c, "y");
  auto w = opt_view(weights_c, "gates");
  expect_kind(rows, kFloatKinds);
  expect_dim(rows, 2);
  if (top_k <= 0) fail("top_k: must be positive");
  if (out.kind != rows.kind) fail("y: must have the dtype of y_sorted");
  expect_dim(out, 2);
  const int64_t t = out.size(0);
  expect_shape(out, {t, rows.size(1)});
  expect_same_device(rows, out);
  if (rows.size(0) != t * top_k)
    fail("y_sorted: expected " + std::to_string(t * top_k) + " rows (tokens * top_k), got " +
         std::to_string(rows.size(0)));
  check_int64(rows, pos, {t * top_k});
  if (w) check_acc_vector(rows, *w, {t, top_k});
  run_entry(
      "moe_combine", rows,
      [&] {
        return moe::unpermute_sum_cpu(rows.data, rows.float_dtype(), t, rows.size(1), top_k, pos.ptr<int64_t>(),
                                      opt_data(w), out.data);
      },
      [&] {
        return moe::unpermute_sum_cuda(rows.data, rows.float_dtype(), t, rows.size(1), top_k, pos.ptr<int64_t>(),
                                       static_cast<const float*>(opt_data(w)), out.data, rows.device,
                                       reinterpret_cast<void*>(stream));
      });
}

void unpermute_sum_backward(const py::capsule& grad_out_c, const py::capsule& rows_c,
                            const py::capsule& sorted_slot_c, const py::capsule& weights_c,
                            const py::capsule& grad_rows_c, const py::capsule& grad_weights_c, uintptr_t stream) {
  View go = view(grad_out_c, "grad_y"), rows = view(rows_c, "y_sorted"), sorted = view(sorted_slot_c, "sorted_slot");
  View w = view(weights_c, "gates"), gr = view(grad_rows_c, "grad_y_sorted"), gw = view(grad_weights_c, "grad_gates");
  expect_kind(rows, kFloatKinds);
  expect_dim(rows, 2);
  expect_dim(w, 2);
  const int64_t t = w.size(0), k = w.size(1);
  check_acc_vector(rows, w, {t, k});
  check_acc_vector(rows, gw, {t, k});
  if (go.kind != rows.kind) fail("grad_y: must have the dtype of y_sorted");
  expect_shape(go, {t, rows.size(1)});
  expect_same_device(rows, go);
  if (gr.kind != rows.kind) fail("grad_y_sorted: must have the dtype of y_sorted");
  expect_shape(gr, rows.shape);
  expect_same_device(rows, gr);
  expect_shape(rows, {t * k, rows.size(1)});
  check_int64(rows, sorted, {t * k});
  run_entry(
      "moe_combine backward", rows,
      [&] {
        return moe::unpermute_sum_backward_cpu(go.data, rows.data, rows.float_dtype(), t, rows.size(1), k,
                                               sorted.ptr<int64_t>(), w.data, gr.data, gw.data);
      },
      [&] {
        return moe::unpermute_sum_backward_cuda(go.data, rows.data, rows.float_dtype(), t, rows.size(1), k,
                                                sorted.ptr<int64_t>(), w.ptr<float>(), gr.data, gw.ptr<float>(),
                                                rows.device, reinterpret_cast<void*>(stream));
      });
}

void scatter_add_rows(const py::capsule& out_c, const py::capsule& rows_c, const py::capsule& slots_c, int64_t top_k,
                      const py::object& weights_c, uintptr_t stream) {
  View out = view(out_c, "out"), rows = view(rows_c, "rows"), slots = view(slots_c, "slots");
  auto w = opt_view(weights_c, "weights");
  expect_kind(rows, kFloatKinds);
  expect_dim(rows, 2);
  if (top_k <= 0) fail("top_k: must be positive");
  expect_kind(out, {rows.acc_kind()});
  expect_dim(out, 2);
  const int64_t t = out.size(0);
  expect_shape(out, {t, rows.size(1)});
  expect_same_device(rows, out);
  check_int64(rows, slots, {rows.size(0)});
  if (w) check_acc_vector(rows, *w, {t * top_k});
  run_entry(
      "moe_scatter_add_rows", rows,
      [&] {
        return moe::scatter_add_rows_cpu(rows.data, rows.float_dtype(), rows.size(0), rows.size(1), top_k,
                                         slots.ptr<int64_t>(), t, opt_data(w), out.data);
      },
      [&] {
        return moe::scatter_add_rows_cuda(rows.data, rows.float_dtype(), rows.size(0), rows.size(1), top_k,
                                          slots.ptr<int64_t>(), t, static_cast<const float*>(opt_data(w)),
                                          out.ptr<float>(), rows.device, reinterpret_cast<void*>(stream));
      });
}

void gelu_tanh_backward_rows(const py::capsule& pre_c, const py::capsule& d_hid_c, const py::object& weights_c,
                             const py::object& hid_w_c, const py::capsule& d_pre_c, const py::object& row_dot_c,
                             uintptr_t stream) {
  View pre = view(pre_c, "pre"), d_hid = view(d_hid_c, "d_hid");
  View d_pre = view(d_pre_c, "d_pre");
  auto hid_w = opt_view(hid_w_c, "hid_w");
  auto w = opt_view(weights_c, "row_weights");
  auto dot = opt_view(row_dot_c, "row_dot");
  expect_kind(pre, kFloatKinds);
  expect_dim(pre, 2);
  for (const View* v : {&d_hid, &d_pre, hid_w ? &*hid_w : &d_pre}) {
    if (v->kind != pre.kind) fail(v->name + ": must have the dtype of pre");
    expect_shape(*v, pre.shape);
    expect_same_device(pre, *v);
  }
  if (w) check_acc_vector(pre, *w, {pre.size(0)});
  if (dot) check_acc_vector(pre, *dot, {pre.size(0)});
  run_entry(
      "moe_gelu_backward_rows", pre,
      [&] {
        return moe::gelu_tanh_backward_rows_cpu(pre.data, d_hid.data, pre.float_dtype(), pre.size(0), pre.size(1),
                                                opt_data(w), opt_data(hid_w), d_pre.data, opt_data(dot));
      },
      [&] {
        return moe::gelu_tanh_backward_rows_cuda(pre.data, d_hid.data, pre.float_dtype(), pre.size(0), pre.size(1),
                                                 static_cast<const float*>(opt_data(w)), opt_data(hid_w), d_pre.data,
                                                 static_cast<float*>(opt_data(dot)), pre.device,
                                                 reinterpret_cast<void*>(stream));
      });
}

void bias_gelu_tanh_rows(const py::capsule& pre_c, const py::capsule& bias_c, const py::capsule& row_expert_c,
                         const py::capsule& act_c, uintptr_t stream) {
  View pre = view(pre_c, "pre"), bias = view(bias_c, "bias"), rows = view(row_expert_c, "row_expert");
  View act = view(act_c, "act");
  expect_kind(pre, kFloatKinds);
  expect_dim(pre, 2);
  expect_dim(bias, 2);
  if (bias.kind != pre.kind) fail("bias: must have the dtype of pre");
  if (bias.size(1) != pre.size(1)) fail("bias: must have the width of pre");
  expect_kind(rows, {Kind::kInt64});
  expect_shape(rows, {pre.size(0)});
  if (act.kind != pre.kind) fail("act: must have the dtype of pre");
  expect_shape(act, pre.shape);
  for (const View* v : {&bias, &rows, &act}) expect_same_device(pre, *v);
  run_entry(
      "moe_bias_gelu_rows", pre,
      [&] {
        return moe::bias_gelu_tanh_rows_cpu(pre.data, bias.data, pre.float_dtype(), pre.size(0), pre.size(1),
                                            rows.ptr<int64_t>(), bias.size(0), act.data);
      },
      [&] {
        return moe::bias_gelu_tanh_rows_cuda(pre.data, bias.data, pre.float_dtype(), pre.size(0), pre.size(1),
                                             rows.ptr<int64_t>(), bias.size(0), act.data, pre.device,
                                             reinterpret_cast<void*>(stream));
      });
}

}  // namespace

void bind_moe(py::module_& m) {
  const py::object none = py::none();
  m.def("moe_gate_forward", &gate_forward, py::arg("router_logits"), py::arg("group_ids"), py::arg("token_mask"),
        py::arg("num_groups"), py::arg("top_k"), py::arg("renormalize"), py::arg("gates"), py::arg("expert_ids"),
        py::arg("expert_counts"), py::arg("group_counts"), py::arg("router_prob_mean"),
        py::arg("workspace_probs") = none, py::arg("workspace_counts") = none, py::arg("workspace_groups") = none,
        py::arg("stream") = 0, "Fused grouped softmax + top-k + renormalise + routing statistics.");
  m.def("moe_gate_backward", &gate_backward, py::arg("router_logits"), py::arg("group_ids"), py::arg("token_mask"),
        py::arg("num_groups"), py::arg("top_k"), py::arg("renormalize"), py::arg("expert_ids"),
        py::arg("group_counts"), py::arg("grad_gates"), py::arg("grad_router_prob_mean"), py::arg("grad_logits"),
        py::arg("stream") = 0, "Gradient of moe_gate with respect to the router logits (softmax recomputed).");
  m.def("moe_sort_slots", &sort_slots, py::arg("expert_ids"), py::arg("num_experts"), py::arg("expert_offsets"),
        py::arg("sorted_slot"), py::arg("workspace") = none, py::arg("stream") = 0,
        "Stable counting sort of the (token, slot) pairs by expert.");
  m.def("moe_invert_permutation", &invert_permutation, py::arg("sorted_slot"), py::arg("slot_pos"),
        py::arg("stream") = 0, "slot_pos[sorted_slot[i]] = i.");
  m.def("moe_permute_rows", &permute_rows, py::arg("x"), py::arg("sorted_slot"), py::arg("top_k"),
        py::arg("x_sorted"), py::arg("stream") = 0, "x_sorted[i] = x[sorted_slot[i] // top_k].");
  m.def("moe_unpermute_sum", &unpermute_sum, py::arg("y_sorted"), py::arg("slot_pos"), py::arg("gates"),
        py::arg("top_k"), py::arg("y"), py::arg("stream") = 0,
        "y[t] = sum_j gates[t, j] * y_sorted[slot_pos[t*k + j]] in the order j = 0..k-1.");
  m.def("moe_unpermute_sum_backward", &unpermute_sum_backward, py::arg("grad_y"), py::arg("y_sorted"),
        py::arg("sorted_slot"), py::arg("gates"), py::arg("grad_y_sorted"), py::arg("grad_gates"),
        py::arg("stream") = 0, "Backward of the weighted combine.");
  m.def("moe_scatter_add_rows", &scatter_add_rows, py::arg("out"), py::arg("rows"), py::arg("slots"),
        py::arg("top_k"), py::arg("weights") = none, py::arg("stream") = 0,
        "out[slots[i] // top_k] += weights[slots[i]] * rows[i] (the slots' tokens distinct).");
  m.def("moe_gelu_tanh_backward_rows", &gelu_tanh_backward_rows, py::arg("pre"), py::arg("d_hid"),
        py::arg("row_weights"), py::arg("hid_w"), py::arg("d_pre"), py::arg("row_dot"), py::arg("stream") = 0,
        "hid_w = w * gelu(pre), d_pre = w * d_hid * gelu'(pre), row_dot = sum_f d_hid * gelu(pre) (tanh form).");
  m.def("moe_bias_gelu_tanh_rows", &bias_gelu_tanh_rows, py::arg("pre"), py::arg("bias"), py::arg("row_expert"),
        py::arg("act"), py::arg("stream") = 0,
        "pre += bias[row_expert] in place, act = gelu(pre) (tanh form) of the rounded sum.");
  m.def("moe_gate_block_tokens", &gate_block_tokens, "Tokens per block of the CUDA gating kernel.");
  m.def("moe_sort_block_slots", &sort_block_slots, "Slots per block of the CUDA sort kernels.");
}

}  // namespace bind
}  // namespace unif2ace
