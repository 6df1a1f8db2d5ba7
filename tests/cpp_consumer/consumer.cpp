// Reads inputs written by the test, runs the D3Diff loss rows and the MoE gate through the installed C++ API, and
// writes the outputs back for the test to compare with torch.
//   input:  int64 N, K, T, G, E, top_k; float logits[N*K]; int64 target[N]; float router[T*G*E]; int64 group[T]
//   output: float lse[N], target_logit[N], gates[T*top_k]; int64 expert_ids[T*top_k]
#include <cstdint>
#include <cstdio>
#include <vector>

#include "unif2ace/device.h"
#include "unif2ace/loss.h"
#include "unif2ace/moe.h"

template <typename T>
bool read(std::FILE* f, std::vector<T>& v, int64_t n) {
  v.resize(static_cast<size_t>(n));
  return std::fread(v.data(), sizeof(T), v.size(), f) == v.size();
}

template <typename T>
void write(std::FILE* f, const std::vector<T>& v) {
  std::fwrite(v.data(), sizeof(T), v.size(), f);
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  std::FILE* in = std::fopen(argv[1], "rb");
  if (in == nullptr) return 2;
  std::vector<int64_t> dims, target, group;
  std::vector<float> logits, router;
  if (!read(in, dims, 6)) return 2;
  const int64_t N = dims[0], K = dims[1], T = dims[2], G = dims[3], E = dims[4], top_k = dims[5];
  if (!read(in, logits, N * K) || !read(in, target, N) || !read(in, router, T * G * E) || !read(in, group, T))
    return 2;
  std::fclose(in);

  const auto f32 = unif2ace::DType::kFloat32;
  std::vector<float> lse(N), target_logit(N), gates(T * top_k), prob_mean(G * E);
  std::vector<int64_t> expert_ids(T * top_k), expert_counts(G * E), group_counts(G);
  unif2ace::Status s = unif2ace::loss::row_lse_target_cpu(logits.data(), f32, N, K, target.data(), -100, lse.data(),
                                                          target_logit.data());
  if (s.ok())
    s = unif2ace::moe::gate_forward_cpu(router.data(), f32, T, G, E, top_k, group.data(), nullptr, true, gates.data(),
                                        expert_ids.data(), expert_counts.data(), group_counts.data(),
                                        prob_mean.data());
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.message.c_str());
    return 1;
  }
  std::FILE* out = std::fopen(argv[2], "wb");
  if (out == nullptr) return 2;
  write(out, lse);
  write(out, target_logit);
  write(out, gates);
  write(out, expert_ids);
  std::fclose(out);
  const char* isa = "";
  unif2ace::cpu_isa(&isa);
  std::printf("consumer_cpp: unif2ace %s, CPU kernels %s\n", unif2ace::library_version(), isa);
  return 0;
}
