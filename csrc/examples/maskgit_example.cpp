// Embedding example: MaskGIT steps of masked discrete diffusion with the unif2ace core alone (no Python, no torch).
// The fused kernel applies classifier-free guidance and temperature, samples every masked position, scores it, and
// re-masks the least confident positions of each sequence. The example checks, against straightforward double
// precision computations: known tokens are kept; the confidence of a sampled token is its log-probability under
// softmax(guided logits / T); each sequence re-masks max(1, min(M - 1, floor(N * cos(pi r / 2)))) of its M masked
// positions, the least confident ones; the drawn tokens follow the softmax (frequencies over many positions); and
// the same seed gives the same tokens. Exit code 0 means every check passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "unif2ace/sampling.h"

namespace {

int failures = 0;

void check(bool cond, const char* what) {
  if (!cond) {
    std::fprintf(stderr, "FAILED: %s\n", what);
    ++failures;
  }
}

}  // namespace

int main() {
  namespace sampling = unif2ace::sampling;
  const double pi = 3.14159265358979323846;
  const int64_t B = 2, N = 48, K = 37, mask_id = K, steps = 8, step = 2;
  const float guidance = 1.5f, temperature = 0.8f;
  const double r = double(step + 1) / double(steps);

  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> cond(B * N * K), uncond(B * N * K);
  for (float& v : cond) v = normal(rng);
  for (float& v : uncond) v = normal(rng);
  std::vector<int64_t> tokens(B * N, mask_id);
  for (int64_t n = 0; n < N; n += 3) tokens[N + n] = n % K;  // sequence 1: every third token already known

  sampling::MaskGitParams p;
  p.batch = B;
  p.seq_len = N;
  p.vocab = K;
  p.mask_id = mask_id;
  p.guidance_scale = guidance;
  p.inv_temperature = 1.0f / temperature;
  p.n_base = static_cast<int64_t>(std::floor(double(N) * std::cos(pi * r / 2)));
  p.seed = 1234;
  p.offset = 0;

  std::vector<int64_t> new_tokens(B * N), sampled(B * N);
  std::vector<float> conf(B * N);
  // Without confidence noise (noise_scale 0) the confidence is exactly the log-probability of the drawn token.
  p.noise_scale = 0.0f;
  unif2ace::Status s = sampling::maskgit_step_cpu(cond.data(), uncond.data(), unif2ace::DType::kFloat32,
                                                  tokens.data(), p, new_tokens.data(), sampled.data(), conf.data());
  if (!s.ok()) {
    std::fprintf(stderr, "maskgit_step failed: %s\n", s.message.c_str());
    return 2;
  }
  double max_logp_err = 0.0;
  for (int64_t i = 0; i < B * N; ++i) {
    if (tokens[i] != mask_id) {
      check(sampled[i] == tokens[i] && new_tokens[i] == tokens[i] && std::isinf(conf[i]) && conf[i] > 0,
            "a known token is kept, with confidence +inf");
      continue;
    }
    check(sampled[i] >= 0 && sampled[i] < K, "a sampled token lies in [0, K)");
    std::vector<double> z(K);
    double zmax = -INFINITY, sum = 0.0;
    for (int64_t k = 0; k < K; ++k) {
      const double c = cond[i * K + k], u = uncond[i * K + k];
      z[k] = (c + guidance * (c - u)) / temperature;
      zmax = std::fmax(zmax, z[k]);
    }
    for (int64_t k = 0; k < K; ++k) sum += std::exp(z[k] - zmax);
    const double logp = z[sampled[i]] - zmax - std::log(sum);
    max_logp_err = std::fmax(max_logp_err, std::fabs(double(conf[i]) - logp));
  }
  check(max_logp_err < 1e-4, "confidence = log softmax(guided logits / T) of the drawn token");

  // With confidence noise: the re-mask count per sequence, and the re-masked positions are the least confident.
  p.noise_scale = float(4.5 * (1.0 - r));
  p.offset = 1;
  s = sampling::maskgit_step_cpu(cond.data(), uncond.data(), unif2ace::DType::kFloat32, tokens.data(), p,
                                 new_tokens.data(), sampled.data(), conf.data());
  if (!s.ok()) return 2;
  for (int64_t b = 0; b < B; ++b) {
    int64_t masked = 0, remasked = 0;
    float max_remasked = -INFINITY, min_kept = INFINITY;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t i = b * N + n;
      if (tokens[i] != mask_id) continue;
      ++masked;
      if (new_tokens[i] == mask_id) {
        ++remasked;
        max_remasked = std::fmax(max_remasked, conf[i]);
      } else {
        check(new_tokens[i] == sampled[i], "an unmasked position takes the drawn token");
        min_kept = std::fmin(min_kept, conf[i]);
      }
    }
    const int64_t expected = std::max<int64_t>(1, std::min<int64_t>(masked - 1, p.n_base));
    check(remasked == expected, "re-mask count max(1, min(M - 1, floor(N cos(pi r / 2))))");
    check(max_remasked <= min_kept, "the re-masked positions are the least confident");
  }
  // Same seed and offset, same result.
  std::vector<int64_t> again(B * N), sampled_again(B * N);
  std::vector<float> conf_again(B * N);
  s = sampling::maskgit_step_cpu(cond.data(), uncond.data(), unif2ace::DType::kFloat32, tokens.data(), p,
                                 again.data(), sampled_again.data(), conf_again.data());
  check(s.ok() && again == new_tokens && sampled_again == sampled, "deterministic for a fixed seed and offset");

  // The draws follow the softmax: one row of logits repeated over many positions, no guidance, last step.
  const int64_t many = 6000, k_small = 6;
  std::vector<float> row = {1.0f, 0.0f, -1.0f, 2.0f, 0.5f, -3.0f}, big(many * k_small);
  for (int64_t i = 0; i < many * k_small; ++i) big[i] = row[i % k_small];
  std::vector<int64_t> all_masked(many, k_small), drawn(many), kept(many);
  std::vector<float> big_conf(many);
  sampling::MaskGitParams q;
  q.batch = 1;
  q.seq_len = many;
  q.vocab = k_small;
  q.mask_id = k_small;
  q.last_step = true;
  q.seed = 99;
  s = sampling::maskgit_step_cpu(big.data(), nullptr, unif2ace::DType::kFloat32, all_masked.data(), q, kept.data(),
                                 drawn.data(), big_conf.data());
  if (!s.ok()) return 2;
  double norm = 0.0;
  for (float z : row) norm += std::exp(double(z));
  double worst_sigma = 0.0;
  for (int64_t k = 0; k < k_small; ++k) {
    int64_t count = 0;
    for (int64_t i = 0; i < many; ++i) count += drawn[i] == k;
    const double prob = std::exp(double(row[k])) / norm;
    const double sigma = std::sqrt(prob * (1 - prob) / double(many));
    worst_sigma = std::fmax(worst_sigma, std::fabs(double(count) / double(many) - prob) / sigma);
  }
  check(worst_sigma < 5.0, "token frequencies match the softmax (within 5 standard deviations)");
  check(kept == drawn, "the last step re-masks nothing");

  std::printf("maskgit step: max |confidence - log p| %.2e, worst frequency deviation %.2f sigma, %d failures\n",
              max_logp_err, worst_sigma, failures);
  return failures == 0 ? 0 : 1;
}
