// The public CPU entry points: each forwards to the copy of the kernels compiled for the CPU level this process
// runs (CMakeLists.txt compiles csrc/<family>/*.cpp once per level, inside namespace <family>::isa_<level>).
//
// Adding a CPU entry point: declare it in the family header, define it inside the family's
// `namespace <family>::U2A_CPU_NS { ... }` block, and add one line X(family, name, number of arguments) below.
// A function a kernel file defines outside that block (an argument check the .cu files call too) is not listed:
// the baseline copy provides it.
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>

#include "unif2ace/device.h"
#include "unif2ace/loss.h"
#include "unif2ace/moe.h"
#include "unif2ace/sampling.h"

#define U2A_CPU_ENTRY_POINTS(X)           \
  X(loss, row_lse_target_cpu, 8)          \
  X(loss, softmax_onehot_grad_cpu, 10)    \
  X(loss, d3diff_rows_cpu, 13)            \
  X(loss, d3diff_rows_grad_cpu, 13)       \
  X(moe, gate_forward_cpu, 14)            \
  X(moe, gate_backward_cpu, 14)           \
  X(moe, sort_slots_cpu, 5)               \
  X(moe, invert_permutation_cpu, 3)       \
  X(moe, permute_rows_cpu, 8)             \
  X(moe, unpermute_sum_cpu, 8)            \
  X(moe, unpermute_sum_backward_cpu, 10)  \
  X(moe, scatter_add_rows_cpu, 9)         \
  X(moe, gelu_tanh_backward_rows_cpu, 9)  \
  X(moe, bias_gelu_tanh_rows_cpu, 8)      \
  X(sampling, maskgit_step_cpu, 8)        \
  X(sampling, sample_next_token_cpu, 4)   \
  X(sampling, philox_noise_cpu, 5)

// The levels built (CMake defines U2A_CPU_LEVEL_<name> = its -march value), in increasing order.
#if defined(U2A_CPU_DISPATCH)
#define U2A_CPU_LEVELS(X, ...) X(baseline, __VA_ARGS__) X(avx2, __VA_ARGS__) X(avx512, __VA_ARGS__)
#elif defined(U2A_CPU_LEVEL_fixed)
#define U2A_CPU_LEVELS(X, ...) X(fixed, __VA_ARGS__)
#else
#define U2A_CPU_LEVELS(X, ...) X(baseline, __VA_ARGS__)
#endif

namespace unif2ace {
namespace {

// ---- Choosing the level ----------------------------------------------------------------------------------------------
struct Choice {
  int level = 0;          // index into U2A_CPU_LEVELS
  const char* name = "";  // reported by cpu_isa()
  std::string error;      // non-empty: UNIF2ACE_CPU_ISA could not be honoured
};

#if defined(U2A_CPU_DISPATCH)
constexpr const char* kLevelNames[] = {"baseline", "avx2", "avx512"};

int best_supported_level() {
  __builtin_cpu_init();
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v4")) return 2;
  if (__builtin_cpu_supports("x86-64-v3")) return 1;
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi") &&
                  __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                  __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  if (v4) return 2;
  if (v3) return 1;
#endif
  return 0;
}

Choice choose() {
  Choice c;
  const int best = best_supported_level();
  c.level = best;
  const char* env = std::getenv("UNIF2ACE_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0) {
    int cap = -1;
    for (int i = 0; i < 3; ++i)
      if (std::strcmp(env, kLevelNames[i]) == 0) cap = i;
    if (cap < 0)
      c.error = std::string("UNIF2ACE_CPU_ISA=") + env + " is not one of baseline, avx2, avx512, auto";
    else if (cap < best)
      c.level = cap;
  }
  c.name = kLevelNames[c.level];
  return c;
}
#else
Choice choose() {
  Choice c;
#if defined(U2A_CPU_LEVEL_fixed)
  c.name = sizeof(U2A_CPU_LEVEL_fixed) > 1 ? U2A_CPU_LEVEL_fixed : "compiler default";
#else
  c.name = "baseline";
#endif
  // One copy only: the variable cannot select anything, but a typo in it is still reported.
  const char* env = std::getenv("UNIF2ACE_CPU_ISA");
  if (env != nullptr && *env != '\0' && std::strcmp(env, "auto") != 0 && std::strcmp(env, "baseline") != 0 &&
      std::strcmp(env, "avx2") != 0 && std::strcmp(env, "avx512") != 0)
    c.error = std::string("UNIF2ACE_CPU_ISA=") + env + " is not one of baseline, avx2, avx512, auto";
  return c;
}
#endif

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

// ---- Forwarding ---------------------------------------------------------------------------------------------------------
template <typename F> struct Signature;
template <typename R, typename... A> struct Signature<R(A...)> {
  using Ret = R;
  using Args = std::tuple<A...>;
  static constexpr size_t arity = sizeof...(A);
};
template <typename F, size_t I> using ArgOf = std::tuple_element_t<I, typename Signature<F>::Args>;

}  // namespace
}  // namespace unif2ace

#define U2A_PARAMS_1(F) ArgOf<F, 0> a0
#define U2A_PARAMS_2(F) U2A_PARAMS_1(F), ArgOf<F, 1> a1
#define U2A_PARAMS_3(F) U2A_PARAMS_2(F), ArgOf<F, 2> a2
#define U2A_PARAMS_4(F) U2A_PARAMS_3(F), ArgOf<F, 3> a3
#define U2A_PARAMS_5(F) U2A_PARAMS_4(F), ArgOf<F, 4> a4
#define U2A_PARAMS_6(F) U2A_PARAMS_5(F), ArgOf<F, 5> a5
#define U2A_PARAMS_7(F) U2A_PARAMS_6(F), ArgOf<F, 6> a6
#define U2A_PARAMS_8(F) U2A_PARAMS_7(F), ArgOf<F, 7> a7
#define U2A_PARAMS_9(F) U2A_PARAMS_8(F), ArgOf<F, 8> a8
#define U2A_PARAMS_10(F) U2A_PARAMS_9(F), ArgOf<F, 9> a9
#define U2A_PARAMS_11(F) U2A_PARAMS_10(F), ArgOf<F, 10> a10
#define U2A_PARAMS_12(F) U2A_PARAMS_11(F), ArgOf<F, 11> a11
#define U2A_PARAMS_13(F) U2A_PARAMS_12(F), ArgOf<F, 12> a12
#define U2A_PARAMS_14(F) U2A_PARAMS_13(F), ArgOf<F, 13> a13
#define U2A_PARAMS_15(F) U2A_PARAMS_14(F), ArgOf<F, 14> a14
#define U2A_PARAMS_16(F) U2A_PARAMS_15(F), ArgOf<F, 15> a15
#define U2A_ARGS_1 a0
#define U2A_ARGS_2 U2A_ARGS_1, a1
#define U2A_ARGS_3 U2A_ARGS_2, a2
#define U2A_ARGS_4 U2A_ARGS_3, a3
#define U2A_ARGS_5 U2A_ARGS_4, a4
#define U2A_ARGS_6 U2A_ARGS_5, a5
#define U2A_ARGS_7 U2A_ARGS_6, a6
#define U2A_ARGS_8 U2A_ARGS_7, a7
#define U2A_ARGS_9 U2A_ARGS_8, a8
#define U2A_ARGS_10 U2A_ARGS_9, a9
#define U2A_ARGS_11 U2A_ARGS_10, a10
#define U2A_ARGS_12 U2A_ARGS_11, a11
#define U2A_ARGS_13 U2A_ARGS_12, a12
#define U2A_ARGS_14 U2A_ARGS_13, a13
#define U2A_ARGS_15 U2A_ARGS_14, a14
#define U2A_ARGS_16 U2A_ARGS_15, a15

// The copy of `name` for one level, declared with the public function's type.
#define U2A_DECLARE_COPY(level, family, name) \
  namespace isa_##level {                     \
  decltype(::unif2ace::family::name) name;    \
  }
#define U2A_COPY_POINTER(level, family, name) &::unif2ace::family::isa_##level::name,

// The public function: same parameters as declared in the header, forwarded to the chosen level's copy.
#define U2A_DEFINE_FORWARDER(family, name, n_args)                                                            \
  namespace unif2ace {                                                                                        \
  namespace family {                                                                                          \
  U2A_CPU_LEVELS(U2A_DECLARE_COPY, family, name)                                                              \
  Status name(U2A_PARAMS_##n_args(decltype(::unif2ace::family::name))) {                                      \
    using F = decltype(::unif2ace::family::name);                                                             \
    static_assert(Signature<F>::arity == n_args, #family "::" #name ": wrong argument count in the list");    \
    static_assert(std::is_same<Signature<F>::Ret, Status>::value, #name ": CPU entry points return Status"); \
    static F* const copies[] = {U2A_CPU_LEVELS(U2A_COPY_POINTER, family, name)};                             \
    const Choice& c = choice();                                                                               \
    if (!c.error.empty()) return Status::Invalid(c.error);                                                    \
    return copies[c.level](U2A_ARGS_##n_args);                                                                \
  }                                                                                                           \
  }                                                                                                           \
  }

U2A_CPU_ENTRY_POINTS(U2A_DEFINE_FORWARDER)

namespace unif2ace {

Status cpu_isa(const char** name) {
  const Choice& c = choice();
  *name = c.name;
  if (!c.error.empty()) return Status::Invalid(c.error);
  return Status::Ok();
}

}  // namespace unif2ace
