"""The build: the core embeds in a C++ program without Python, and the module reports what it contains."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import unif2ace

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cpp_example_runs_without_python(tmp_path):
    """Configure the core alone (no Python module, no CUDA), build the example program and run it."""
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DUNIF2ACE_PYTHON=OFF", "-DUNIF2ACE_CUDA=OFF",
         "-DCMAKE_BUILD_TYPE=Release", *gen],
        check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(build), "--target", "d3diff_example", "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True)
    out = subprocess.run([str(build / "d3diff_example")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "relative error" in out.stdout


def test_with_cuda_flag_matches_the_module():
    from unif2ace import _C

    assert unif2ace.WITH_CUDA is bool(_C.with_cuda)
    if os.environ.get("UNIF2ACE_EXPECT_CUDA") == "1":  # set by .ci/run, which builds with UNIF2ACE_CUDA=1
        assert unif2ace.WITH_CUDA
