/* Prints the first n raw 64-bit draws of the Philox stream (seed, offset) through the installed C ABI, one hex
 * number per line, for the test to compare with its own Philox implementation.
 * Usage: consumer_c SEED OFFSET N */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "unif2ace/c_api.h"

int main(int argc, char** argv) {
  uint64_t seed, offset;
  int64_t n, i, *draws;
  if (argc != 4) return 2;
  seed = strtoull(argv[1], NULL, 10);
  offset = strtoull(argv[2], NULL, 10);
  n = strtoll(argv[3], NULL, 10);
  if (strcmp(unif2ace_version(), UNIF2ACE_VERSION_STRING) != 0 || unif2ace_abi_version() != UNIF2ACE_C_ABI_VERSION) {
    fprintf(stderr, "header/library mismatch\n");
    return 1;
  }
  draws = malloc((size_t)n * sizeof *draws);
  if (draws == NULL) return 2;
  if (unif2ace_philox_noise_cpu(seed, offset, n, UNIF2ACE_NOISE_UNIFORM64, draws) != UNIF2ACE_OK) {
    fprintf(stderr, "%s\n", unif2ace_last_error());
    return 1;
  }
  for (i = 0; i < n; ++i) printf("%016" PRIx64 "\n", (uint64_t)draws[i]);
  free(draws);
  return 0;
}
