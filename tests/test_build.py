"""The build: the module reports what it contains (the C/C++ library itself: tests/test_cpp_package.py)."""
import os

import unif2ace


def test_with_cuda_flag_matches_the_module():
    from unif2ace import _C

    assert unif2ace.WITH_CUDA is bool(_C.with_cuda)
    if os.environ.get("UNIF2ACE_EXPECT_CUDA") == "1":  # set by .ci/run, which builds with UNIF2ACE_CUDA=1
        assert unif2ace.WITH_CUDA


def test_cpu_isa_reports_the_level_in_use():
    level = unif2ace.cpu_isa()
    assert level in ("baseline", "avx2", "avx512") or level == os.environ.get("UNIF2ACE_CPU_ARCH")
    if os.environ.get("UNIF2ACE_CPU_ISA") in ("baseline", "avx2"):
        assert level == os.environ["UNIF2ACE_CPU_ISA"]
