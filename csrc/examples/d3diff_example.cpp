// Embedding example: the D3Diff loss of a small batch computed with the unif2ace core alone (no Python, no
// torch). It builds random logits, calls the row kernel, forms the per-row loss of docs/design.md §4 and checks
// it against a straightforward double-precision computation. Exit code 0 means they agree.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "unif2ace/loss.h"

int main() {
  const int64_t n_rows = 37, n_cols = 1000, ignore_index = -100;
  const double alpha = 0.01, w_max = 1000.0, pi = 3.14159265358979323846;
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::uniform_int_distribution<int64_t> pick(0, n_cols - 1);
  std::uniform_real_distribution<double> unit(0.05, 1.0);

  std::vector<float> logits(n_rows * n_cols);
  for (float& z : logits) z = normal(rng);
  std::vector<int64_t> target(n_rows);
  std::vector<double> gamma(n_rows);
  for (int64_t n = 0; n < n_rows; ++n) {
    target[n] = (n % 5 == 0) ? ignore_index : pick(rng);  // every fifth row is an unmasked token
    gamma[n] = unit(rng);
  }

  std::vector<float> lse(n_rows), target_logit(n_rows);
  unif2ace::Status s = unif2ace::loss::row_lse_target_cpu(logits.data(), unif2ace::DType::kFloat32, n_rows, n_cols,
                                                          target.data(), ignore_index, lse.data(),
                                                          target_logit.data());
  if (!s.ok()) {
    std::fprintf(stderr, "row_lse_target failed: %s\n", s.message.c_str());
    return 2;
  }

  double loss = 0.0, expected = 0.0;
  int64_t masked = 0;
  for (int64_t n = 0; n < n_rows; ++n) {
    if (target[n] == ignore_index) continue;
    ++masked;
    const double w = std::fmin(w_max, (pi / 2) * std::sqrt(1 - gamma[n] * gamma[n]) / gamma[n]);
    // score="sedd": l = CE + alpha * w * (CE + phi(u)), u = LSE - log K, phi(u) = e^u - u - 1.
    const double ce = double(lse[n]) - double(target_logit[n]);
    const double u = double(lse[n]) - std::log(double(n_cols));
    loss += ce + alpha * w * (ce + std::exp(u) - u - 1);

    double row_max = -INFINITY, sum = 0.0;
    for (int64_t k = 0; k < n_cols; ++k) row_max = std::fmax(row_max, double(logits[n * n_cols + k]));
    for (int64_t k = 0; k < n_cols; ++k) sum += std::exp(double(logits[n * n_cols + k]) - row_max);
    const double ref_lse = row_max + std::log(sum);
    const double ref_ce = ref_lse - double(logits[n * n_cols + target[n]]);
    const double ref_u = ref_lse - std::log(double(n_cols));
    expected += ref_ce + alpha * w * (ref_ce + std::exp(ref_u) - ref_u - 1);
  }
  loss /= double(masked);
  expected /= double(masked);
  const double rel = std::fabs(loss - expected) / std::fabs(expected);
  std::printf("d3diff loss over %lld masked rows: kernel %.7f  reference %.7f  relative error %.2e\n",
              static_cast<long long>(masked), loss, expected, rel);
  return rel < 1e-5 ? 0 : 1;
}
