// Python entry points of the sampling family.
#include "bind_util.h"
#include "unif2ace/sampling.h"

namespace unif2ace {
namespace bind {

namespace {

void check_same_logits(const View& a, const View& b) {
  if (b.kind != a.kind) fail(b.name + ": must have the dtype of " + a.name);
  expect_shape(b, a.shape);
  expect_same_device(a, b);
}

void maskgit_step(const py::capsule& cond_c, const py::object& uncond_o, const py::capsule& tokens_c,
                  const py::capsule& new_tokens_c, const py::capsule& sampled_c, const py::capsule& confidence_c,
                  int64_t mask_id, float guidance_scale, float inv_temperature, float noise_scale, int64_t n_base,
                  bool last_step, uint64_t seed, uint64_t offset, uintptr_t stream) {
  View cond = view(cond_c, "cond_logits"), tokens = view(tokens_c, "tokens");
  View new_tokens = view(new_tokens_c, "new_tokens"), sampled = view(sampled_c, "sampled");
  View confidence = view(confidence_c, "confidence");
  expect_kind(cond, {Kind::kFloat32, Kind::kBFloat16, Kind::kFloat16});
  expect_dim(cond, 3);
  const int64_t B = cond.size(0), N = cond.size(1), K = cond.size(2);
  if (K == 0) fail("cond_logits: the codebook size K must be positive");
  const void* uncond_ptr = nullptr;
  if (!uncond_o.is_none()) {
    View uncond = view(uncond_o.cast<py::capsule>(), "uncond_logits");
    check_same_logits(cond, uncond);
    uncond_ptr = uncond.data;
  }
  for (View* v : {&tokens, &new_tokens, &sampled}) {
    expect_kind(*v, {Kind::kInt64});
    expect_shape(*v, {B, N});
    expect_same_device(cond, *v);
  }
  expect_kind(confidence, {Kind::kFloat32});
  expect_shape(confidence, {B, N});
  expect_same_device(cond, confidence);
  if (mask_id >= 0 && mask_id < K)
    fail("mask_id: must lie outside the codebook [0, " + std::to_string(K) + "), got " + std::to_string(mask_id));

  sampling::MaskGitParams p;
  p.batch = B;
  p.seq_len = N;
  p.vocab = K;
  p.mask_id = mask_id;
  p.guidance_scale = guidance_scale;
  p.inv_temperature = inv_temperature;
  p.noise_scale = noise_scale;
  p.n_base = n_base;
  p.last_step = last_step;
  p.seed = seed;
  p.offset = offset;
  run_entry(
      "maskgit_step", cond,
      [&] {
        return sampling::maskgit_step_cpu(cond.data, uncond_ptr, cond.float_dtype(), tokens.ptr<int64_t>(), p,
                                          new_tokens.ptr<int64_t>(), sampled.ptr<int64_t>(),
                                          confidence.ptr<float>());
      },
      [&] {
        return sampling::maskgit_step_cuda(cond.data, uncond_ptr, cond.float_dtype(), tokens.ptr<int64_t>(), p,
                                           new_tokens.ptr<int64_t>(), sampled.ptr<int64_t>(), confidence.ptr<float>(),
                                           cond.device, reinterpret_cast<void*>(stream));
      });
}

void sample_next_token(const py::capsule& logits_c, const py::capsule& out_c, float inv_temperature, bool greedy,
                       int64_t top_k, double top_p, uint64_t seed, uint64_t offset, uintptr_t stream) {
  View logits = view(logits_c, "logits"), out = view(out_c, "out");
  expect_kind(logits, {Kind::kFloat32, Kind::kBFloat16, Kind::kFloat16});
  expect_dim(logits, 2);
  if (logits.size(1) == 0) fail("logits: the vocabulary size must be positive");
  expect_kind(out, {Kind::kInt64});
  expect_shape(out, {logits.size(0)});
  expect_same_device(logits, out);
  sampling::NextTokenParams p;
  p.batch = logits.size(0);
  p.vocab = logits.size(1);
  p.inv_temperature = inv_temperature;
  p.greedy = greedy;
  p.top_k = top_k;
  p.top_p = top_p;
  p.seed = seed;
  p.offset = offset;
  run_entry(
      "sample_next_token", logits,
      [&] { return sampling::sample_next_token_cpu(logits.data, logits.float_dtype(), p, out.ptr<int64_t>()); },
      [&] {
        return sampling::sample_next_token_cuda(logits.data, logits.float_dtype(), p, out.ptr<int64_t>(),
                                                logits.device, reinterpret_cast<void*>(stream));
      });
}

void philox_noise(const py::capsule& out_c, int kind, uint64_t seed, uint64_t offset, uintptr_t stream) {
  View out = view(out_c, "out");
  const auto k = static_cast<sampling::NoiseKind>(kind);
  switch (k) {
    case sampling::NoiseKind::kUniform: expect_kind(out, {Kind::kFloat64}); break;
    case sampling::NoiseKind::kGumbel: expect_kind(out, {Kind::kFloat32}); break;
    case sampling::NoiseKind::kUniform64: expect_kind(out, {Kind::kInt64}); break;
    default: fail("kind: must be 0 (uniform), 1 (gumbel) or 2 (uniform64)");
  }
  run_entry(
      "philox_noise", out, [&] { return sampling::philox_noise_cpu(seed, offset, out.numel(), k, out.data); },
      [&] {
        return sampling::philox_noise_cuda(seed, offset, out.numel(), k, out.data, out.device,
                                           reinterpret_cast<void*>(stream));
      });
}

}  // namespace

void bind_sampling(py::module_& m) {
  m.def("maskgit_step", &maskgit_step, py::arg("cond_logits"), py::arg("uncond_logits"), py::arg("tokens"),
        py::arg("new_tokens"), py::arg("sampled"), py::arg("confidence"), py::arg("mask_id"),
        py::arg("guidance_scale"), py::arg("inv_temperature"), py::arg("noise_scale"), py::arg("n_base"),
        py::arg("last_step"), py::arg("seed"), py::arg("offset"), py::arg("stream") = 0,
        "One fused MaskGIT step (docs/design.md §6) into new_tokens[B, N], sampled[B, N], confidence[B, N].");
  m.def("sample_next_token", &sample_next_token, py::arg("logits"), py::arg("out"), py::arg("inv_temperature"),
        py::arg("greedy"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"), py::arg("offset"),
        py::arg("stream") = 0, "Temperature / top-k / top-p draw of one token per row of logits[B, V].");
  m.def("philox_noise", &philox_noise, py::arg("out"), py::arg("kind"), py::arg("seed"), py::arg("offset"),
        py::arg("stream") = 0, "The Philox noise stream of the sampling kernels, element i from block i.");
}

}  // namespace bind
}  // namespace unif2ace
