#!/usr/bin/env bash
# Builds the C++ core and its Python module with AddressSanitizer + UndefinedBehaviorSanitizer and runs the op
# tests (bad-input and fuzz tests included) against that build. Python itself is not instrumented, so the
# sanitizer runtimes are preloaded and leak detection is off (the interpreter keeps memory until exit).
set -euo pipefail
cd "$(dirname "$0")/.."
# Default: every op test file (kernel families and the fuzz tests of the op boundary).
TESTS=${*:-$(ls tests/test_loss_*.py tests/test_moe_*.py tests/test_sampling_*.py tests/test_fuzz_*.py 2>/dev/null)}

out=$(mktemp -d)
module=$(ls unif2ace/_C*.so)
cp "$module" "$out/regular_C.so"
# The instrumented module replaces the regular one for this run only.
trap 'cp "$out/regular_C.so" "$module"; rm -rf "$out"' EXIT
build=build/sanitize
gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
cmake -S . -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DUNIF2ACE_PYTHON=ON -DUNIF2ACE_CUDA=OFF \
  -DUNIF2ACE_SANITIZE=ON -DUNIF2ACE_EXAMPLES=ON -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$out/sanitized" >/dev/null
cmake --build "$build" -j "$(nproc)" >/dev/null

# The example programs (C++ and C) run as plain instrumented programs, at every CPU level of the portable build.
for level in baseline avx2 avx512; do
  for example in d3diff_example moe_routing_example maskgit_example c_api_example; do
    UNIF2ACE_CPU_ISA=$level "$build/$example" >/dev/null
  done
done

cp "$out"/sanitized/_C*.so "$module"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
python -c "import unif2ace; print('sanitized core loaded:', unif2ace._C.__file__)"
# torch.compile tests exercise the compiler, not the core, and are slow under the preloaded runtimes.
python -m pytest -q -p no:cacheprovider -k "not compile" $TESTS
