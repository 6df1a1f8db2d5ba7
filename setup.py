"""Builds the torch-free C++/CUDA core and its pybind11 module `unif2ace._C` with CMake + Ninja.

Environment switches (read at build time):
  UNIF2ACE_CUDA=1|0       force the CUDA kernels on (fail without nvcc) or off; unset: on when nvcc is found
  UNIF2ACE_CUDA_ARCHS     CMAKE_CUDA_ARCHITECTURES, default "80-real;90" (sm_80 and sm_90 SASS + sm_90 PTX)
  UNIF2ACE_CPU_ARCH       CPU kernels: "portable" (default: baseline x86-64, AVX2 and AVX-512 copies chosen at run
                          time, so the build runs on any x86-64 CPU), or one copy for a -march value ("native" for
                          this machine only), or "" (one copy with the compiler's default flags)
  UNIF2ACE_SANITIZE=1     AddressSanitizer + UndefinedBehaviorSanitizer for the C++ core
  UNIF2ACE_BUILD_TYPE     CMake build type, default Release
  UNIF2ACE_JOBS           parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def cuda_setting():
    flag = os.environ.get("UNIF2ACE_CUDA", "").strip().lower()
    nvcc = find_nvcc()
    if flag in ("1", "on", "true", "yes"):
        if nvcc is None:
            raise RuntimeError(
                "UNIF2ACE_CUDA=1 but nvcc was not found (looked in CUDACXX, CUDA_HOME, CUDA_PATH, PATH, "
                "/usr/local/cuda/bin). Install the CUDA toolkit or unset UNIF2ACE_CUDA."
            )
        return nvcc
    if flag in ("0", "off", "false", "no"):
        return None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        nvcc = cuda_setting()
        build_type = os.environ.get("UNIF2ACE_BUILD_TYPE", "Release")
        sanitize = os.environ.get("UNIF2ACE_SANITIZE", "0") == "1"
        cpu_arch = os.environ.get("UNIF2ACE_CPU_ARCH", "portable")
        flavour = f"{build_type.lower()}-{'cuda' if nvcc else 'cpu'}{'-san' if sanitize else ''}"
        if cpu_arch != "portable":
            flavour += f"-march-{cpu_arch or 'default'}"
        build_dir = ROOT / "build" / f"py{sys.version_info[0]}{sys.version_info[1]}-{flavour}"
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake = shutil.which("cmake")
        ninja = shutil.which("ninja")
        if cmake is None:
            raise RuntimeError("cmake was not found; `pip install cmake ninja`")
        # A cache written by another cmake/ninja (for example pip's deleted build-isolation copies) breaks
        # the next configure: start over when the tools changed.
        stamp = build_dir / "tools.stamp"
        tools = f"{cmake}\n{ninja}\n{nvcc}\n{sys.executable}\n"
        if not stamp.exists() or stamp.read_text() != tools:
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)
            stamp.write_text(tools)

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DUNIF2ACE_CPU_ARCH={cpu_arch}",
            f"-DUNIF2ACE_SANITIZE={'ON' if sanitize else 'OFF'}",
            "-DUNIF2ACE_PYTHON=ON",
        ]
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        if nvcc:
            archs = os.environ.get("UNIF2ACE_CUDA_ARCHS", "80-real;90")
            args += ["-DUNIF2ACE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]
        else:
            args += ["-DUNIF2ACE_CUDA=OFF"]
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, check=True)
        jobs = os.environ.get("UNIF2ACE_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("unif2ace._C")], cmdclass={"build_ext": CMakeBuild})
