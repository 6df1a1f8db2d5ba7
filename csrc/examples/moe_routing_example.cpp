// Embedding example: one grouped-MoE routing pass with the unif2ace core alone (no Python, no torch):
// gate (softmax + top-k + renormalise per token's group) -> sort the (token, slot) pairs by expert -> gather the
// token rows into expert order -> run each expert on its contiguous block of rows -> weighted combine back to token
// order. Every expert here is an elementwise y = tanh(a_e * x + b_e), so the whole layer can be recomputed
// straightforwardly in double precision per token; the example checks the kernels against that computation and
// exits with 0 when they agree.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "unif2ace/moe.h"

namespace {

bool ok(const unif2ace::Status& s, const char* what) {
  if (!s.ok()) std::fprintf(stderr, "%s failed: %s\n", what, s.message.c_str());
  return s.ok();
}

}  // namespace

int main() {
  namespace moe = unif2ace::moe;
  const auto f32 = unif2ace::DType::kFloat32;
  const int64_t T = 53, G = 2, E = 4, K = 2, H = 24;  // tokens, groups, experts per group, top-k, hidden size
  const int64_t NE = G * E, S = T * K;                  // experts in all, (token, slot) pairs

  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(T * H), router_logits(T * NE), a(NE), b(NE);
  std::vector<int64_t> group_ids(T);
  for (float& v : x) v = normal(rng);
  for (float& v : router_logits) v = 2.0f * normal(rng);
  for (int64_t e = 0; e < NE; ++e) a[e] = 0.5f + 0.1f * float(e), b[e] = 0.05f * float(e) - 0.2f;
  for (int64_t t = 0; t < T; ++t) group_ids[t] = (t % 3 == 0) ? 1 : 0;
  router_logits[5 * NE + 1] = router_logits[5 * NE + 2];  // a tie inside group 0 of token 5: the lower expert wins

  // 1. Gate.
  std::vector<float> gates(S), prob_mean(NE);
  std::vector<int64_t> expert_ids(S), expert_counts(NE), group_counts(G);
  if (!ok(moe::gate_forward_cpu(router_logits.data(), f32, T, G, E, K, group_ids.data(), nullptr, true, gates.data(),
                                expert_ids.data(), expert_counts.data(), group_counts.data(), prob_mean.data()),
          "gate_forward"))
    return 2;
  // 2. Sort the slots by expert; 3. the inverse permutation.
  std::vector<int64_t> offsets(NE + 1), sorted_slot(S), slot_pos(S);
  if (!ok(moe::sort_slots_cpu(expert_ids.data(), S, NE, offsets.data(), sorted_slot.data()), "sort_slots") ||
      !ok(moe::invert_permutation_cpu(sorted_slot.data(), S, slot_pos.data()), "invert_permutation"))
    return 2;
  // 4. Gather the rows into expert order.
  std::vector<float> rows(S * H);
  if (!ok(moe::permute_rows_cpu(x.data(), f32, T, H, K, sorted_slot.data(), S, rows.data()), "permute_rows"))
    return 2;
  // 5. Each expert on its block of rows [offsets[e], offsets[e + 1]).
  for (int64_t e = 0; e < NE; ++e)
    for (int64_t i = offsets[e] * H; i < offsets[e + 1] * H; ++i) rows[i] = std::tanh(a[e] * rows[i] + b[e]);
  // 6. Weighted combine back to token order.
  std::vector<float> y(T * H);
  if (!ok(moe::unpermute_sum_cpu(rows.data(), f32, T, H, K, slot_pos.data(), gates.data(), y.data()), "unpermute_sum"))
    return 2;

  // Reference, per token in double: softmax over its group, top-k (ties to the lower expert), renormalised gates.
  double max_err = 0.0;
  int bad_routes = 0;
  std::vector<int64_t> ref_counts(NE, 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t g = group_ids[t];
    const float* z = &router_logits[t * NE + g * E];
    const double zmax = *std::max_element(z, z + E);
    std::vector<double> p(E);
    double sum = 0.0;
    for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(double(z[e]) - zmax));
    for (double& v : p) v /= sum;
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t i, int64_t j) { return z[i] > z[j]; });
    double kept = 0.0;
    for (int64_t j = 0; j < K; ++j) kept += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      const int64_t ge = g * E + order[j];
      ++ref_counts[ge];
      bad_routes += expert_ids[t * K + j] != ge;
      max_err = std::max(max_err, std::fabs(double(gates[t * K + j]) - p[order[j]] / kept));
    }
    for (int64_t h = 0; h < H; ++h) {
      double ref = 0.0;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t ge = g * E + order[j];
        ref += p[order[j]] / kept * std::tanh(double(a[ge]) * double(x[t * H + h]) + double(b[ge]));
      }
      max_err = std::max(max_err, std::fabs(double(y[t * H + h]) - ref));
    }
  }
  // The sort is stable: within an expert, slots ascend.
  bool sorted_ok = offsets[0] == 0 && offsets[NE] == S;
  for (int64_t e = 0; e < NE; ++e) {
    sorted_ok = sorted_ok && offsets[e + 1] - offsets[e] == ref_counts[e] && expert_counts[e] == ref_counts[e];
    for (int64_t i = offsets[e]; i < offsets[e + 1]; ++i)
      sorted_ok = sorted_ok && expert_ids[sorted_slot[i]] == e && (i == offsets[e] || sorted_slot[i - 1] < sorted_slot[i]);
  }
  std::printf("moe routing: %lld tokens, %lld experts, top-%lld: wrong routes %d, sort %s, max abs error %.2e\n",
              static_cast<long long>(T), static_cast<long long>(NE), static_cast<long long>(K), bad_routes,
              sorted_ok ? "ok" : "WRONG", max_err);
  return (bad_routes == 0 && sorted_ok && max_err < 1e-5) ? 0 : 1;
}
