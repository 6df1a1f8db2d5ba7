/* Embedding example in plain C99 against the C ABI (unif2ace/c_api.h): library queries, the per-row log-sum-exp and
 * target logit of the D3Diff loss checked against a direct double-precision computation, raw Philox noise, the MoE
 * sort checked against a counting sort written here, and the error path (error codes and the thread's message).
 * Exit code 0 means every check passed. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unif2ace/c_api.h"

static int failures = 0;

static void check(int cond, const char* what) {
  if (!cond) {
    fprintf(stderr, "FAILED: %s (last error: %s)\n", what, unif2ace_last_error());
    ++failures;
  }
}

int main(void) {
  enum { ROWS = 9, COLS = 301, SLOTS = 40, EXPERTS = 5, NOISE = 1000 };
  const int64_t ignore_index = -100;
  float logits[ROWS * COLS], lse[ROWS], target_logit[ROWS];
  int64_t target[ROWS];
  const char* isa = NULL;
  double max_err = 0.0;
  int i, k, e;

  /* Library queries: the linked library matches these headers. */
  check(strcmp(unif2ace_version(), UNIF2ACE_VERSION_STRING) == 0, "library version == header version");
  check(unif2ace_abi_version() == UNIF2ACE_C_ABI_VERSION, "C ABI version == header version");
  check(unif2ace_cpu_isa(&isa) == UNIF2ACE_OK && isa != NULL, "cpu_isa");

  /* Loss rows: lse and target logit against a double-precision computation. */
  srand(5);
  for (i = 0; i < ROWS * COLS; ++i) logits[i] = 8.0f * ((float)rand() / (float)RAND_MAX - 0.5f);
  for (i = 0; i < ROWS; ++i) target[i] = (i == 4) ? ignore_index : (int64_t)((i * 37) % COLS);
  check(unif2ace_row_lse_target_cpu(logits, UNIF2ACE_FLOAT32, ROWS, COLS, target, ignore_index, lse, target_logit) ==
            UNIF2ACE_OK,
        "row_lse_target_cpu succeeds");
  for (i = 0; i < ROWS; ++i) {
    double m = -INFINITY, sum = 0.0, ref;
    if (target[i] == ignore_index) {
      check(lse[i] == 0.0f && target_logit[i] == 0.0f, "an ignored row gets zeros");
      continue;
    }
    for (k = 0; k < COLS; ++k) m = fmax(m, (double)logits[i * COLS + k]);
    for (k = 0; k < COLS; ++k) sum += exp((double)logits[i * COLS + k] - m);
    ref = m + log(sum);
    max_err = fmax(max_err, fabs((double)lse[i] - ref) / fabs(ref));
    check(target_logit[i] == logits[i * COLS + target[i]], "target logit");
  }
  check(max_err < 1e-6, "lse within 1e-6 (relative) of the double computation");

  /* Raw Philox noise: uniforms in [0, 1), the same numbers for the same (seed, offset). */
  {
    static double u[NOISE], again[NOISE];
    double mean = 0.0;
    check(unif2ace_philox_noise_cpu(42, 7, NOISE, UNIF2ACE_NOISE_UNIFORM, u) == UNIF2ACE_OK, "philox uniform");
    check(unif2ace_philox_noise_cpu(42, 7, NOISE, UNIF2ACE_NOISE_UNIFORM, again) == UNIF2ACE_OK, "philox again");
    for (i = 0; i < NOISE; ++i) {
      check(u[i] >= 0.0 && u[i] < 1.0 && u[i] == again[i], "uniform in [0, 1), reproducible");
      mean += u[i] / NOISE;
    }
    check(fabs(mean - 0.5) < 5 * sqrt(1.0 / 12.0 / NOISE), "uniform mean near 1/2");
  }

  /* MoE: stable sort of expert ids against a counting sort. */
  {
    int64_t ids[SLOTS], offsets[EXPERTS + 1], sorted_slot[SLOTS], expected[SLOTS], pos = 0;
    for (i = 0; i < SLOTS; ++i) ids[i] = (i * 7 + 3) % EXPERTS;
    check(unif2ace_moe_sort_slots_cpu(ids, SLOTS, EXPERTS, offsets, sorted_slot) == UNIF2ACE_OK, "sort_slots");
    for (e = 0; e < EXPERTS; ++e) {
      check(offsets[e] == pos, "expert offsets");
      for (i = 0; i < SLOTS; ++i)
        if (ids[i] == e) expected[pos++] = i;
    }
    check(offsets[EXPERTS] == SLOTS && memcmp(sorted_slot, expected, sizeof expected) == 0, "sorted slots");
  }

  /* Errors: a code, and a message naming the argument; nothing is written. */
  target[0] = COLS;
  lse[0] = -1.0f;
  check(unif2ace_row_lse_target_cpu(logits, UNIF2ACE_FLOAT32, ROWS, COLS, target, ignore_index, lse, target_logit) ==
            UNIF2ACE_ERROR_INVALID_ARGUMENT,
        "an out-of-range target is an invalid argument");
  check(strstr(unif2ace_last_error(), "target") != NULL && lse[0] == -1.0f, "the message names target; no output");
  check(unif2ace_row_lse_target_cpu(logits, 17, ROWS, COLS, target, ignore_index, lse, target_logit) ==
            UNIF2ACE_ERROR_INVALID_ARGUMENT && strstr(unif2ace_last_error(), "dtype") != NULL,
        "an unknown dtype is an invalid argument");
  check(unif2ace_row_lse_target_cpu(NULL, UNIF2ACE_FLOAT32, ROWS, COLS, target, ignore_index, lse, target_logit) ==
            UNIF2ACE_ERROR_INVALID_ARGUMENT && strstr(unif2ace_last_error(), "logits") != NULL,
        "a NULL buffer is an invalid argument");
  if (!unif2ace_built_with_cuda())
    check(unif2ace_philox_noise_cuda(1, 0, 4, UNIF2ACE_NOISE_UNIFORM, NULL, 0, NULL) == UNIF2ACE_ERROR_NOT_BUILT,
          "CUDA functions report a build without CUDA");
  check(unif2ace_philox_noise_cpu(1, 0, 0, UNIF2ACE_NOISE_GUMBEL, NULL) == UNIF2ACE_OK &&
            unif2ace_last_error()[0] == '\0',
        "a successful call clears the message");

  printf("c api: unif2ace %s (C ABI %d, CPU kernels: %s), lse max relative error %.2e, %d failures\n",
         unif2ace_version(), unif2ace_abi_version(), isa, max_err, failures);
  return failures == 0 ? 0 : 1;
}
