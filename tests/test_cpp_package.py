"""The kernels as a C/C++ library: the CMake build of the core alone (static and shared library, the example
programs), its install tree (headers, CMake package, pkg-config file), a separate CMake project and a C program that
find it, the C ABI through ctypes (no pybind11), and the per-level copies of the CPU kernels. Outputs are compared
with torch/numpy computations made here. The core is configured, built and installed once per test session."""
import ctypes
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LEVELS = ["baseline", "avx2", "avx512"]
EXAMPLES = ["d3diff_example", "moe_routing_example", "maskgit_example", "c_api_example"]

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


def run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out


def generator():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


@pytest.fixture(scope="session")
def package(tmp_path_factory):
    """The core configured without Python and CUDA, with the shared library and the examples, built and installed
    into a fresh prefix."""
    base = tmp_path_factory.mktemp("unif2ace_cpp")
    build, prefix = base / "build", base / "prefix"
    run(["cmake", "-S", ROOT, "-B", build, *generator(), "-DCMAKE_BUILD_TYPE=Release", "-DUNIF2ACE_PYTHON=OFF",
         "-DUNIF2ACE_CUDA=OFF", "-DUNIF2ACE_SHARED=ON", "-DUNIF2ACE_EXAMPLES=ON", f"-DCMAKE_INSTALL_PREFIX={prefix}"])
    run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)])
    run(["cmake", "--install", build])
    libdir = next(d for d in (prefix / "lib", prefix / "lib64") if d.is_dir())
    return SimpleNamespace(build=build, prefix=prefix, libdir=libdir)


@pytest.fixture(scope="session")
def best_level(package):
    """The highest CPU level this machine runs (what the dispatcher picks without a cap)."""
    out = run([package.build / "c_api_example"], env={**os.environ, "UNIF2ACE_CPU_ISA": "auto"}).stdout
    return re.search(r"CPU kernels: (\w+)", out).group(1)


def available_levels(best):
    return LEVELS[: LEVELS.index(best) + 1]


# ---- Examples and the per-level copies of the CPU kernels ---------------------------------------------------------

@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_pass_at_every_cpu_level(package, best_level, example):
    for level in available_levels(best_level):
        out = run([package.build / example], env={**os.environ, "UNIF2ACE_CPU_ISA": level})
        if example == "c_api_example":
            assert f"CPU kernels: {level})" in out.stdout


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or os.uname().machine != "x86_64", reason="needs qemu-user")
@pytest.mark.parametrize("cpu,level", [("qemu64", "baseline"), ("Haswell", "avx2")])
def test_examples_on_emulated_older_cpus(package, cpu, level):
    """On an emulated CPU without AVX (QEMU's qemu64: x86-64 with SSE3) or without AVX-512 (Haswell), the dispatcher
    picks the level the CPU has and every example passes there: nothing outside the kernel copies needs more."""
    for example in EXAMPLES:
        out = run(["qemu-x86_64", "-cpu", cpu, package.build / example])
        if example == "c_api_example":
            assert f"CPU kernels: {level})" in out.stdout


def test_unknown_cpu_level_is_a_clear_error(package):
    out = subprocess.run([package.build / "c_api_example"], capture_output=True, text=True,
                         env={**os.environ, "UNIF2ACE_CPU_ISA": "sse9"})
    assert out.returncode != 0
    assert "UNIF2ACE_CPU_ISA=sse9 is not one of baseline, avx2, avx512, auto" in out.stderr


def functions(obj):
    """{demangled function name: [instruction lines]} of an object file."""
    text = run(["objdump", "-d", "-C", "--no-show-raw-insn", obj]).stdout
    funcs, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            current = funcs.setdefault(m.group(1), [])
        elif current is not None and "\t" in line:
            current.append(line.split("\t", 1)[1])
    return funcs


# Instructions beyond baseline x86-64 (SSE2) that -march=x86-64 code must not contain: every VEX/EVEX instruction
# (mnemonics starting with v), SSE3/SSSE3/SSE4 and the BMI/LZCNT/POPCNT/MOVBE integer extensions.
BEYOND_SSE2 = re.compile(r"^(v\w+|pshufb|ptest|round[ps][sd]|blendv\w+|pblend\w+|pmins[bd]|pmaxs[bd]|pminu[wd]|"
                         r"pmaxu[wd]|pmulld|pcmpeqq|pcmpgtq|packusdw|pmov[sz]x\w+|insertps|extractps|pinsr[bdq]|"
                         r"pextr[bdq]|dpp[sd]|haddp[sd]|movs[lh]dup|movddup|lddqu|popcnt|lzcnt|tzcnt|andn|bextr|"
                         r"blsi|blsr|blsmsk|bzhi|pdep|pext|sarx|shlx|shrx|rorx|mulx|movbe)\b")
# Hot loops of each family: their copies must use the level's vector width (ymm for avx2, zmm for avx512).
HOT_LOOPS = ["row_lse<float, float>", "grad_rows<float, float>", "::masses(", "gelu_tanh_backward_rows<true, float, float>"]


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64" or shutil.which("objdump") is None,
                    reason="x86-64 Linux with objdump")
def test_cpu_level_copies_use_their_instruction_sets(package):
    copies = {level: functions(package.build / "cpu_levels" / f"{level}.o") for level in LEVELS}
    beyond = [(f, i) for f, lines in copies["baseline"].items() for i in lines if BEYOND_SSE2.match(i)]
    assert not beyond, f"baseline copy uses instructions beyond SSE2: {beyond[:5]}"
    wide = [(f, i) for f, lines in copies["avx2"].items() for i in lines if "%zmm" in i or re.search(r"%k[1-7]", i)]
    assert not wide, f"avx2 copy uses AVX-512: {wide[:5]}"
    # The OpenMP-outlined regions and the inlined helpers (cpu::fast_exp) get the level too.
    for level in LEVELS:
        assert not any("fast_exp" in i for lines in copies[level].values() for i in lines if "call" in i)
        assert any("._omp_fn" in f for f in copies[level])
    checked = 0
    for hot in HOT_LOOPS:
        names = {level: [f for f in copies[level] if hot in f] for level in LEVELS}
        if not all(names.values()):
            continue  # renamed or inlined: the other loops still check the widths
        checked += 1
        for level, register in (("avx2", "%ymm"), ("avx512", "%zmm")):
            assert any(register in i for f in names[level] for i in copies[level][f]), (level, hot)
    assert checked >= 3


def test_cpu_level_copies_export_only_their_entry_points(package):
    """Everything a copy shares by name with the others (std::vector, inline helpers) is local to it, so the linker
    cannot pick one level's instance for all; only the copy's own entry points stay global."""
    if not (package.build / "cpu_levels").is_dir():
        pytest.skip("a single copy of the kernels (not x86-64 Linux with GNU binutils)")
    for level in ("avx2", "avx512"):  # the baseline copy's instances are safe for all, it keeps them
        out = run(["nm", "-g", "--defined-only", package.build / "cpu_levels" / f"{level}.o"]).stdout
        names = [line.split()[-1] for line in out.splitlines() if line.split()[1] not in ("C",)]
        assert names, level
        stray = [n for n in names if f"{len(level) + 4}isa_{level}" not in n]
        assert not stray, (level, stray[:5])


def c_api_functions():
    header = (ROOT / "csrc/include/unif2ace/c_api.h").read_text()
    return re.findall(r"UNIF2ACE_API [^;(]*?\b(unif2ace_\w+)\(", header)


def test_shared_library_exports_the_c_abi_and_the_cpp_api_only(package):
    lib = package.libdir / "libunif2ace.so"
    out = run(["nm", "-D", "--defined-only", "-C", lib]).stdout
    names = [line.split(" ", 2)[2] for line in out.splitlines()]
    assert all(n.startswith("unif2ace_") or n.startswith("unif2ace::") for n in names), names
    assert not [n for n in names if "::isa_avx" in n]
    missing = set(c_api_functions()) - set(names)
    assert not missing and len(c_api_functions()) > 30


def test_install_tree(package):
    p = package.prefix
    headers = {f.name for f in (p / "include/unif2ace").iterdir()}
    assert {"c_api.h", "common.h", "cpu_math.h", "device.h", "loss.h", "moe.h", "philox.h", "sampling.h",
            "version.h"} <= headers
    assert "cuda_utils.cuh" not in headers  # internal to the .cu sources
    docs = (ROOT / "docs/cpp.md").read_text()
    assert not [h for h in headers if f"`unif2ace/{h}`" not in docs], "every installed header is documented"
    assert (package.libdir / "libunif2ace.a").is_file() and (package.libdir / "libunif2ace.so").exists()
    cmake_dir = package.libdir / "cmake/unif2ace"
    assert {"unif2aceConfig.cmake", "unif2aceConfigVersion.cmake", "unif2aceTargets.cmake"} <= {
        f.name for f in cmake_dir.iterdir()}
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert f'#define UNIF2ACE_VERSION_STRING "{version}"' in (p / "include/unif2ace/version.h").read_text()
    assert f"Version: {version}" in (package.libdir / "pkgconfig/unif2ace.pc").read_text()


# ---- Out-of-tree consumers ------------------------------------------------------------------------------------------

def test_find_package_consumer(package, tmp_path):
    """A separate CMake project that only does find_package(unif2ace), fed with inputs from here, compared with
    torch in float64."""
    build = tmp_path / "build"
    conf = run(["cmake", "-S", ROOT / "tests/cpp_consumer", "-B", build, *generator(),
                f"-DCMAKE_PREFIX_PATH={package.prefix}"])
    assert "WITH_CUDA=OFF core property=OFF CPU_ARCH=portable C_ABI=1" in conf.stdout
    run(["cmake", "--build", build])

    g = torch.Generator().manual_seed(3)
    n, k, t, groups, experts, top_k = 37, 301, 29, 2, 5, 2
    logits = torch.randn(n, k, generator=g) * 4
    target = torch.randint(0, k, (n,), generator=g)
    target[::7] = -100
    router = torch.randn(t, groups * experts, generator=g)
    group = torch.randint(0, groups, (t,), generator=g)
    blob = (np.array([n, k, t, groups, experts, top_k], np.int64).tobytes() + logits.numpy().tobytes()
            + target.numpy().tobytes() + router.numpy().tobytes() + group.numpy().tobytes())
    (tmp_path / "in.bin").write_bytes(blob)
    run([build / "consumer_cpp", tmp_path / "in.bin", tmp_path / "out.bin"])
    raw = (tmp_path / "out.bin").read_bytes()
    floats = np.frombuffer(raw, np.float32, count=2 * n + t * top_k)
    ids = np.frombuffer(raw, np.int64, offset=floats.nbytes)
    lse, target_logit, gates = floats[:n], floats[n:2 * n], floats[2 * n:].reshape(t, top_k)

    kept = target != -100
    ref_lse = torch.logsumexp(logits.double(), 1)
    torch.testing.assert_close(torch.from_numpy(lse.copy())[kept].double(), ref_lse[kept], rtol=1e-6, atol=0)
    assert (lse[~kept.numpy()] == 0).all()
    assert np.array_equal(target_logit[kept.numpy()], logits[kept, target[kept]].numpy())
    for i in range(t):
        z = router[i, group[i] * experts:(group[i] + 1) * experts].double()
        p, e = torch.softmax(z, 0).topk(top_k)
        assert ids[i * top_k:(i + 1) * top_k].tolist() == (e + group[i] * experts).tolist()
        torch.testing.assert_close(torch.from_numpy(gates[i].copy()).double(), p / p.sum(), rtol=1e-6, atol=1e-7)


def philox_uniform64(seed, offset, n):
    """The first n raw draws of the noise stream, from the published Philox 4x32-10 (test_sampling_philox.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_sampling_philox import stream_py

    return [(x[1] << 32) | x[0] for x in (stream_py(seed, offset, i) for i in range(n))]


def test_find_package_c_consumer_on_the_shared_library(package, tmp_path):
    build = tmp_path / "build"
    run(["cmake", "-S", ROOT / "tests/cpp_consumer", "-B", build, *generator(),
         f"-DCMAKE_PREFIX_PATH={package.prefix}"])
    run(["cmake", "--build", build, "--target", "consumer_c"])
    seed, offset = 2**40 + 7, 12
    out = run([build / "consumer_c", seed, offset, 50]).stdout.split()
    assert [int(x, 16) for x in out] == philox_uniform64(seed, offset, 50)


@pytest.mark.skipif(shutil.which("pkg-config") is None or shutil.which("cc") is None, reason="needs pkg-config, cc")
@pytest.mark.parametrize("linkage", ["shared", "static"])
def test_pkg_config_consumer(package, tmp_path, linkage):
    pc_dir = package.libdir / "pkgconfig"
    if linkage == "static":  # an install without the shared library: -lunif2ace finds the archive
        copy = tmp_path / "prefix"
        shutil.copytree(package.prefix / "include", copy / "include")
        (copy / "lib/pkgconfig").mkdir(parents=True)
        shutil.copy(package.libdir / "libunif2ace.a", copy / "lib")
        shutil.copy(pc_dir / "unif2ace.pc", copy / "lib/pkgconfig")
        pc_dir = copy / "lib/pkgconfig"
    env = {**os.environ, "PKG_CONFIG_PATH": str(pc_dir)}
    flags = ["--cflags", "--libs"] + (["--static"] if linkage == "static" else [])
    pc = run(["pkg-config", *flags, "unif2ace"], env=env).stdout.split()
    exe = tmp_path / "consumer"
    run(["cc", "-std=c99", ROOT / "tests/cpp_consumer/consumer.c", "-o", exe, *pc])
    needed = run(["readelf", "-d", exe]).stdout if shutil.which("readelf") else ""
    assert ("libunif2ace.so" in needed) == (linkage == "shared")
    env = {**os.environ, "LD_LIBRARY_PATH": str(package.libdir)}
    out = run([exe, 5, 0, 8], env=env).stdout.split()
    assert [int(x, 16) for x in out] == philox_uniform64(5, 0, 8)


def docs_files():
    """{file name: code} of the docs/cpp.md code blocks marked <!-- test-file: NAME -->, and the programs marked
    <!-- test-run: NAME -->."""
    text = (ROOT / "docs/cpp.md").read_text()
    files = dict(re.findall(r"<!-- test-file: (\S+) -->\n(?:<!-- test-run: \S+ -->\n)?```\w*\n(.*?)```", text, re.S))
    return files, re.findall(r"<!-- test-run: (\S+) -->", text)


def test_docs_examples_build_and_run(package, tmp_path):
    """The C, C++ and CMake blocks of docs/cpp.md form one consumer project: built against the install, run."""
    files, programs = docs_files()
    assert {"CMakeLists.txt", "rows.cpp", "rows_c.c", "ctypes_example.py"} <= set(files) and programs
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    run(["cmake", "-S", tmp_path, "-B", tmp_path / "build", *generator(), f"-DCMAKE_PREFIX_PATH={package.prefix}"])
    run(["cmake", "--build", tmp_path / "build"])
    for program in programs:
        run([tmp_path / "build" / program])
    run([sys.executable, tmp_path / "ctypes_example.py"],
        env={**os.environ, "UNIF2ACE_LIBRARY": str(package.libdir / "libunif2ace.so")})


# ---- The C ABI through ctypes -----------------------------------------------------------------------------------------

c_int64_p = ctypes.POINTER(ctypes.c_int64)


class MaskGitParams(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("seq_len", ctypes.c_int64), ("vocab", ctypes.c_int64),
                ("mask_id", ctypes.c_int64), ("n_base", ctypes.c_int64), ("seed", ctypes.c_uint64),
                ("offset", ctypes.c_uint64), ("guidance_scale", ctypes.c_float), ("inv_temperature", ctypes.c_float),
                ("noise_scale", ctypes.c_float), ("last_step", ctypes.c_int32)]


class NextTokenParams(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("vocab", ctypes.c_int64), ("top_k", ctypes.c_int64),
                ("seed", ctypes.c_uint64), ("offset", ctypes.c_uint64), ("top_p", ctypes.c_double),
                ("inv_temperature", ctypes.c_float), ("greedy", ctypes.c_int32)]


@pytest.fixture(scope="session")
def lib(package):
    lib = ctypes.CDLL(str(package.libdir / "libunif2ace.so"))
    vp, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    sigs = {
        "unif2ace_last_error": ([], ctypes.c_char_p),
        "unif2ace_version": ([], ctypes.c_char_p),
        "unif2ace_abi_version": ([], ctypes.c_int),
        "unif2ace_built_with_cuda": ([], ctypes.c_int),
        "unif2ace_cpu_isa": ([ctypes.POINTER(ctypes.c_char_p)], ctypes.c_int),
        "unif2ace_row_lse_target_cpu": ([vp, i32, i64, i64, vp, i64, vp, vp], ctypes.c_int),
        "unif2ace_softmax_onehot_grad_cpu": ([vp, vp, i32, i64, i64, vp, vp, i64, vp, vp], ctypes.c_int),
        "unif2ace_moe_gate_forward_cpu": ([vp, i32, i64, i64, i64, i64, vp, vp, i32, vp, vp, vp, vp, vp],
                                          ctypes.c_int),
        "unif2ace_moe_sort_slots_cpu": ([vp, i64, i64, vp, vp], ctypes.c_int),
        "unif2ace_maskgit_step_cpu": ([vp, vp, i32, vp, ctypes.POINTER(MaskGitParams), vp, vp, vp], ctypes.c_int),
        "unif2ace_sample_next_token_cpu": ([vp, i32, ctypes.POINTER(NextTokenParams), vp], ctypes.c_int),
        "unif2ace_philox_noise_cpu": ([ctypes.c_uint64, ctypes.c_uint64, i64, i32, vp], ctypes.c_int),
        "unif2ace_philox_noise_cuda": ([ctypes.c_uint64, ctypes.c_uint64, i64, i32, vp, ctypes.c_int, vp],
                                       ctypes.c_int),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def ptr(a):
    return ctypes.c_void_p(a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr())


def test_ctypes_library_queries(lib):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert lib.unif2ace_version().decode() == version
    assert lib.unif2ace_abi_version() == 1
    name = ctypes.c_char_p()
    assert lib.unif2ace_cpu_isa(ctypes.byref(name)) == 0 and name.value.decode() in LEVELS
    assert lib.unif2ace_built_with_cuda() == 0
    assert lib.unif2ace_philox_noise_cuda(1, 0, 4, 0, None, 0, None) == 3  # UNIF2ACE_ERROR_NOT_BUILT
    assert b"without CUDA" in lib.unif2ace_last_error()


@pytest.mark.parametrize("dtype,code", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2),
                                        (torch.float64, 3)])
def test_ctypes_loss_rows(lib, dtype, code):
    g = torch.Generator().manual_seed(code)
    n, k = 19, 1000
    logits = (torch.randn(n, k, generator=g) * 3).to(dtype)
    target = torch.randint(0, k, (n,), generator=g)
    target[3] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lse, tl = torch.empty(n, dtype=acc), torch.empty(n, dtype=acc)
    assert lib.unif2ace_row_lse_target_cpu(ptr(logits), code, n, k, ptr(target), -100, ptr(lse), ptr(tl)) == 0
    assert lib.unif2ace_last_error() == b""
    ref = torch.logsumexp(logits.double(), 1)
    keep = target != -100
    torch.testing.assert_close(lse[keep].double(), ref[keep], rtol=1e-6 if acc == torch.float32 else 1e-12, atol=0)
    assert torch.equal(tl[keep], logits[keep, target[keep]].to(acc))

    # The gradient in place: coef_softmax * softmax - coef_onehot * onehot.
    cs, co = torch.rand(n, generator=g, dtype=acc), torch.rand(n, generator=g, dtype=acc)
    grad = logits.clone()
    assert lib.unif2ace_softmax_onehot_grad_cpu(ptr(grad), ptr(grad), code, n, k, ptr(lse), ptr(target), -100,
                                                ptr(cs), ptr(co)) == 0
    ref_grad = cs.double()[:, None] * torch.softmax(logits.double(), 1)
    ref_grad[keep, target[keep]] -= co.double()[keep]
    ref_grad[~keep] = 0
    tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 1e-2)
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), rtol=tol, atol=tol * 1e-3)


class D3DiffOptions(ctypes.Structure):
    _fields_ = [("alpha", ctypes.c_double), ("n_classes", ctypes.c_int64), ("ignore_index", ctypes.c_int64),
                ("sedd", ctypes.c_int32), ("reserved", ctypes.c_int32)]


@pytest.mark.parametrize("sedd", [0, 1])
def test_ctypes_d3diff_rows(lib, sedd):
    """Loss, row statistics and the in-place gradient of the D3Diff rows against float64 autograd."""
    fn = lib.unif2ace_d3diff_rows_cpu
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [vp, vp, ctypes.c_int32, i64, i64, i64, vp, vp, vp, ctypes.POINTER(D3DiffOptions), vp, vp, vp]
    g = torch.Generator().manual_seed(8 + sedd)
    n, k, alpha = 23, 517, 0.3
    logits = torch.randn(n, k, generator=g) * 3
    target = torch.randint(0, k, (n,), generator=g)
    target[[2, 9]] = -100
    w, scale = torch.rand(n, generator=g) * 5, torch.rand(n, generator=g)
    loss, row_max, log_sum = torch.empty(n), torch.empty(n), torch.empty(n)
    grad = logits.clone()
    opts = D3DiffOptions(alpha=alpha, n_classes=k, ignore_index=-100, sedd=sedd, reserved=0)
    assert fn(ptr(grad), ptr(grad), 0, n, k, k, ptr(target), ptr(w), ptr(scale), ctypes.byref(opts), ptr(loss),
              ptr(row_max), ptr(log_sum)) == 0, lib.unif2ace_last_error()

    z = logits.double().requires_grad_()
    keep = target != -100
    lse = torch.logsumexp(z, 1)
    ce = lse - z.gather(1, target.clamp(min=0)[:, None])[:, 0]
    aw = alpha * w.double()
    u = lse - math.log(k)
    ref = (1 + aw) * ce + (aw * (torch.expm1(u) - u) if sedd else 0)
    ref = torch.where(keep, ref, torch.zeros_like(ref))
    (ref * scale.double()).sum().backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row_max[keep].double(), logits[keep].double().amax(1), rtol=0, atol=0)
    torch.testing.assert_close((row_max + log_sum)[keep].double(), lse[keep].detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), z.grad, rtol=1e-5, atol=1e-6)


def test_ctypes_moe_gate_and_sort(lib):
    g = torch.Generator().manual_seed(1)
    t, groups, experts, top_k = 41, 2, 6, 3
    ne = groups * experts
    logits = torch.randn(t, ne, generator=g)
    group = torch.randint(0, groups, (t,), generator=g)
    gates, ids = torch.empty(t, top_k), torch.empty(t, top_k, dtype=torch.int64)
    counts, gcounts, pmean = (torch.empty(ne, dtype=torch.int64), torch.empty(groups, dtype=torch.int64),
                              torch.empty(ne))
    assert lib.unif2ace_moe_gate_forward_cpu(ptr(logits), 0, t, groups, experts, top_k, ptr(group), None, 1,
                                             ptr(gates), ptr(ids), ptr(counts), ptr(gcounts), ptr(pmean)) == 0
    local = logits.view(t, groups, experts)[torch.arange(t), group].double()
    p = torch.softmax(local, 1)
    top_p, top_e = p.topk(top_k, 1)
    assert torch.equal(ids, top_e + group[:, None] * experts)
    torch.testing.assert_close(gates.double(), top_p / top_p.sum(1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, torch.bincount(ids.flatten(), minlength=ne))
    assert torch.equal(gcounts, torch.bincount(group, minlength=groups))

    offsets, order = torch.empty(ne + 1, dtype=torch.int64), torch.empty(t * top_k, dtype=torch.int64)
    assert lib.unif2ace_moe_sort_slots_cpu(ptr(ids), t * top_k, ne, ptr(offsets), ptr(order)) == 0
    assert np.array_equal(order.numpy(), np.argsort(ids.flatten().numpy(), kind="stable"))
    assert np.array_equal(offsets.numpy(), np.concatenate([[0], np.cumsum(counts.numpy())]))


def test_ctypes_sampling(lib):
    g = torch.Generator().manual_seed(2)
    # MaskGIT without confidence noise: the confidence of a masked position is the log-probability of its draw.
    b, n, k = 2, 33, 50
    cond = torch.randn(b, n, k, generator=g) * 2
    tokens = torch.full((b, n), k, dtype=torch.int64)
    tokens[1, ::4] = torch.arange(0, n, 4) % k
    new, sampled, conf = torch.empty_like(tokens), torch.empty_like(tokens), torch.empty(b, n)
    params = MaskGitParams(batch=b, seq_len=n, vocab=k, mask_id=k, n_base=10, seed=7, offset=0, guidance_scale=0.0,
                           inv_temperature=1.25, noise_scale=0.0, last_step=0)
    assert lib.unif2ace_maskgit_step_cpu(ptr(cond), None, 0, ptr(tokens), ctypes.byref(params), ptr(new),
                                         ptr(sampled), ptr(conf)) == 0
    masked = tokens == k
    logp = torch.log_softmax(cond.double() * 1.25, -1).gather(-1, sampled.clamp(0, k - 1)[..., None])[..., 0]
    torch.testing.assert_close(conf[masked].double(), logp[masked], rtol=0, atol=1e-4)
    assert torch.equal(sampled[~masked], tokens[~masked]) and torch.isinf(conf[~masked]).all()
    for row in range(b):
        m = int(masked[row].sum())
        assert int((new[row] == k).sum()) == max(1, min(m - 1, 10))

    # Greedy next-token sampling is the first argmax.
    logits = torch.randn(5, 77, generator=g)
    out = torch.empty(5, dtype=torch.int64)
    nt = NextTokenParams(batch=5, vocab=77, top_k=0, seed=0, offset=0, top_p=1.0, inv_temperature=1.0, greedy=1)
    assert lib.unif2ace_sample_next_token_cpu(ptr(logits), 0, ctypes.byref(nt), ptr(out)) == 0
    assert torch.equal(out, logits.argmax(1))

    draws = np.empty(20, np.int64)
    assert lib.unif2ace_philox_noise_cpu(99, 3, 20, 2, ptr(draws)) == 0
    assert (draws.view(np.uint64).tolist()) == philox_uniform64(99, 3, 20)


def test_ctypes_errors(lib):
    logits, target = np.zeros((2, 3), np.float32), np.array([0, 3], np.int64)
    lse = np.full(2, -1.0, np.float32)
    tl = np.empty(2, np.float32)
    assert lib.unif2ace_row_lse_target_cpu(ptr(logits), 0, 2, 3, ptr(target), -100, ptr(lse), ptr(tl)) == 1
    assert b"target[1] = 3 is outside [0, 3)" in lib.unif2ace_last_error()
    assert (lse == -1).all()  # nothing written
    assert lib.unif2ace_row_lse_target_cpu(ptr(logits), 9, 2, 3, ptr(target), -100, ptr(lse), ptr(tl)) == 1
    assert lib.unif2ace_last_error().startswith(b"dtype: 9")
    assert lib.unif2ace_row_lse_target_cpu(ptr(logits), 0, 2, 3, None, -100, ptr(lse), ptr(tl)) == 1
    assert lib.unif2ace_last_error() == b"target: NULL pointer"
    assert lib.unif2ace_philox_noise_cpu(0, 0, 4, 7, ptr(np.empty(4))) == 1
    params = NextTokenParams(batch=1, vocab=3, top_k=0, seed=0, offset=0, top_p=1.0, inv_temperature=1.0, greedy=0)
    bad = np.array([[0.0, np.nan, 1.0]], np.float32)
    assert lib.unif2ace_sample_next_token_cpu(ptr(bad), 0, ctypes.byref(params), ptr(np.empty(1, np.int64))) == 1
    assert b"NaN" in lib.unif2ace_last_error()
    assert lib.unif2ace_sample_next_token_cpu(ptr(bad), 0, None, ptr(np.empty(1, np.int64))) == 1


def test_ctypes_out_of_memory_is_an_error_code(lib):
    """A std::bad_alloc inside the core (here a histogram for 2^50 experts) comes back as an error code."""
    ids, order = np.zeros(1, np.int64), np.empty(1, np.int64)
    assert lib.unif2ace_moe_sort_slots_cpu(ptr(ids), 1, 2**50, None, ptr(order)) == 1  # NULL offsets first
    offsets = np.empty(2, np.int64)
    assert lib.unif2ace_moe_sort_slots_cpu(ptr(ids), 1, 2**50, ptr(offsets), ptr(order)) == 4
    assert b"out of memory" in lib.unif2ace_last_error()


def test_ctypes_last_error_is_per_thread(lib):
    logits, target = np.zeros((1, 2), np.float32), np.array([5], np.int64)
    out = np.empty(1, np.float32)
    assert lib.unif2ace_row_lse_target_cpu(ptr(logits), 0, 1, 2, ptr(target), -100, ptr(out), ptr(out)) == 1
    seen = []

    def other():
        seen.append(lib.unif2ace_last_error())
        seen.append(lib.unif2ace_philox_noise_cpu(0, 0, 4, 9, ptr(np.empty(4))))
        seen.append(lib.unif2ace_last_error())

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert seen[0] == b"" and seen[1] == 1 and seen[2].startswith(b"kind: 9")
    assert b"target[0] = 5" in lib.unif2ace_last_error()


# ---- The op tests at each CPU level -------------------------------------------------------------------------------------

# The suite runs at the CPU's best level; these runs repeat one kernel-vs-reference file per family at lower levels
# (UNIF2ACE_TEST_CPU_LEVELS=baseline,avx2 adds AVX2; the examples above already run at every level).
OP_TESTS = ["tests/test_loss_rows.py", "tests/test_moe_ops.py", "tests/test_sampling_maskgit.py"]
CHECKED_LEVELS = os.environ.get("UNIF2ACE_TEST_CPU_LEVELS", "baseline").split(",")


@pytest.mark.parametrize("level", CHECKED_LEVELS)
def test_op_tests_pass_with_lower_cpu_levels(level, best_level):
    """The Python module's kernels, capped at a lower level, against the references. The opcheck and torch.compile
    tests exercise torch, not the level, and are left out."""
    import unif2ace

    if level not in available_levels(best_level) or unif2ace.cpu_isa() not in LEVELS:
        pytest.skip(f"needs a portable build on a CPU with {level}")
    env = {**os.environ, "UNIF2ACE_CPU_ISA": level}
    probe = run([sys.executable, "-c", "import unif2ace; print(unif2ace.cpu_isa())"], env=env, cwd=ROOT)
    assert probe.stdout.strip() == level
    run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not opcheck and not compile",
         *OP_TESTS], env=env, cwd=ROOT)


# ---- The C ABI's CUDA functions (on a GPU machine) ----------------------------------------------------------------

@pytest.fixture(scope="session")
def cuda_lib(tmp_path_factory):
    """libunif2ace.so with the CUDA kernels for this GPU, through the same ctypes signatures plus the CUDA ones."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("needs nvcc")
    build = tmp_path_factory.mktemp("unif2ace_cuda") / "build"
    run(["cmake", "-S", ROOT, "-B", build, *generator(), "-DCMAKE_BUILD_TYPE=Release", "-DUNIF2ACE_PYTHON=OFF",
         "-DUNIF2ACE_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DCMAKE_CUDA_ARCHITECTURES=native",
         "-DUNIF2ACE_SHARED=ON", "-DUNIF2ACE_EXAMPLES=OFF"])
    run(["cmake", "--build", build, "--target", "unif2ace_shared", "-j", str(os.cpu_count() or 2)])
    lib = ctypes.CDLL(str(build / "libunif2ace.so"))
    vp, i64, i32, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int
    sigs = {
        "unif2ace_row_lse_target": [vp, i32, i64, i64, vp, i64, vp, vp],
        "unif2ace_softmax_onehot_grad": [vp, vp, i32, i64, i64, vp, vp, i64, vp, vp],
        "unif2ace_d3diff_rows": [vp, vp, i32, i64, i64, i64, vp, vp, vp, ctypes.POINTER(D3DiffOptions), vp, vp, vp],
        "unif2ace_moe_sort_slots": [vp, i64, i64, vp, vp],
        "unif2ace_moe_invert_permutation": [vp, i64, vp],
        "unif2ace_moe_permute_rows": [vp, i32, i64, i64, i64, vp, i64, vp],
        "unif2ace_moe_unpermute_sum": [vp, i32, i64, i64, i64, vp, vp, vp],
        "unif2ace_maskgit_step": [vp, vp, i32, vp, ctypes.POINTER(MaskGitParams), vp, vp, vp],
        "unif2ace_philox_noise": [ctypes.c_uint64, ctypes.c_uint64, i64, i32, vp],
    }
    for name, args in sigs.items():
        getattr(lib, name + "_cpu").argtypes = args
        getattr(lib, name + "_cuda").argtypes = args + [i, vp]
    lib.unif2ace_moe_gate_forward_cuda.argtypes = [vp, i32, i64, i64, i64, i64, vp, vp, i32, vp, vp, vp, vp, vp, vp,
                                                   vp, vp, i, vp]
    lib.unif2ace_moe_gate_forward_cpu.argtypes = [vp, i32, i64, i64, i64, i64, vp, vp, i32, vp, vp, vp, vp, vp]
    lib.unif2ace_moe_sort_slots_cuda.argtypes = [vp, i64, i64, vp, vp, vp, i, vp]  # + the block_counts workspace
    lib.unif2ace_moe_sort_block_slots.restype = i64
    lib.unif2ace_moe_gate_block_tokens.restype = i64
    lib.unif2ace_last_error.restype = ctypes.c_char_p
    return lib


@pytest.mark.cuda
@pytest.mark.skipif(os.environ.get("UNIF2ACE_SMALL") == "1", reason="compiles the library: not under memcheck")
def test_c_abi_cuda_functions_match_cpu(cuda_lib):
    """Each family's CUDA functions through the C ABI, on the current stream, against the same library's CPU ones."""
    lib, dev = cuda_lib, torch.device("cuda")
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)

    def both(name, make_args):
        """Runs name_cpu on CPU tensors and name_cuda on their CUDA copies; returns the two argument lists."""
        cpu_args = make_args("cpu")
        cuda_args = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in cpu_args]
        conv = lambda a: ptr(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
        assert getattr(lib, name + "_cpu")(*map(conv, cpu_args)) == 0, lib.unif2ace_last_error()
        assert getattr(lib, name + "_cuda")(*map(conv, cuda_args), 0, stream) == 0, lib.unif2ace_last_error()
        torch.cuda.synchronize()
        return cpu_args, [a.cpu() if isinstance(a, torch.Tensor) else a for a in cuda_args]

    g = torch.Generator().manual_seed(4)
    n, k = 37, 5000
    logits, target = torch.randn(n, k, generator=g) * 3, torch.randint(0, k, (n,), generator=g)
    target[5] = -100
    a, b = both("unif2ace_row_lse_target", lambda d: [logits, 0, n, k, target, -100, torch.empty(n), torch.empty(n)])
    torch.testing.assert_close(a[6], b[6], rtol=1e-5, atol=1e-5)
    assert torch.equal(a[7], b[7])
    lse, cs, co = a[6], torch.rand(n, generator=g), torch.rand(n, generator=g)
    a, b = both("unif2ace_softmax_onehot_grad",
                lambda d: [logits, torch.empty(n, k), 0, n, k, lse, target, -100, cs, co])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    opts = D3DiffOptions(alpha=0.3, n_classes=k, ignore_index=-100, sedd=1, reserved=0)
    w = torch.rand(n, generator=g) * 5
    a, b = both("unif2ace_d3diff_rows", lambda d: [logits, logits.clone(), 0, n, k, k, target, w, cs,
                                                   ctypes.byref(opts), torch.empty(n), torch.empty(n), torch.empty(n)])
    for i in (1, 10, 11, 12):  # gradient, loss, row max, log-sum
        torch.testing.assert_close(a[i], b[i], rtol=1e-5, atol=1e-6)

    t, groups, experts, top_k, hidden = 300, 2, 8, 4, 48
    ne = groups * experts
    router, gid = torch.randn(t, ne, generator=g), torch.randint(0, groups, (t,), generator=g)
    outs = {}
    for d in ("cpu", "cuda"):
        gates, ids = torch.empty(t, top_k, device=d), torch.empty(t, top_k, dtype=torch.int64, device=d)
        counts, gcounts = torch.empty(ne, dtype=torch.int64, device=d), torch.empty(groups, dtype=torch.int64, device=d)
        pmean = torch.empty(ne, device=d)
        args = [ptr(router.to(d)), 0, t, groups, experts, top_k, ptr(gid.to(d)), None, 1, ptr(gates), ptr(ids),
                ptr(counts), ptr(gcounts), ptr(pmean)]
        if d == "cuda":
            nb = -(-t // lib.unif2ace_moe_gate_block_tokens())
            ws = [torch.empty(nb, ne, device=d), torch.empty(nb, ne, dtype=torch.int64, device=d),
                  torch.empty(nb, groups, dtype=torch.int64, device=d)]
            assert lib.unif2ace_moe_gate_forward_cuda(*args, *map(ptr, ws), 0, stream) == 0, lib.unif2ace_last_error()
            torch.cuda.synchronize()
        else:
            assert lib.unif2ace_moe_gate_forward_cpu(*args) == 0
        outs[d] = [x.cpu() for x in (gates, ids, counts, gcounts, pmean)]
    for x, y in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    ids = outs["cpu"][1]
    offsets, order = torch.empty(ne + 1, dtype=torch.int64), torch.empty(t * top_k, dtype=torch.int64)
    assert lib.unif2ace_moe_sort_slots_cpu(ptr(ids), t * top_k, ne, ptr(offsets), ptr(order)) == 0
    ids_d, off_d, order_d = ids.to(dev), torch.empty_like(offsets, device=dev), torch.empty_like(order, device=dev)
    nb = -(-t * top_k // lib.unif2ace_moe_sort_block_slots())
    ws = torch.empty(nb, ne + 1, dtype=torch.int64, device=dev)
    assert lib.unif2ace_moe_sort_slots_cuda(ptr(ids_d), t * top_k, ne, ptr(off_d), ptr(order_d), ptr(ws), 0,
                                            stream) == 0
    torch.cuda.synchronize()
    assert torch.equal(off_d.cpu(), offsets) and torch.equal(order_d.cpu(), order)
    a, b = both("unif2ace_moe_invert_permutation", lambda d: [order, t * top_k, torch.empty_like(order)])
    assert torch.equal(a[2], b[2])
    x = torch.randn(t, hidden, generator=g)
    a, b = both("unif2ace_moe_permute_rows",
                lambda d: [x, 0, t, hidden, top_k, order, t * top_k, torch.empty(t * top_k, hidden)])
    assert torch.equal(a[7], b[7])
    rows, gates, slot_pos = a[7], outs["cpu"][0], torch.empty_like(order)
    assert lib.unif2ace_moe_invert_permutation_cpu(ptr(order), t * top_k, ptr(slot_pos)) == 0
    a, b = both("unif2ace_moe_unpermute_sum",
                lambda d: [rows, 0, t, hidden, top_k, slot_pos, gates, torch.empty(t, hidden)])
    torch.testing.assert_close(a[7], b[7], rtol=1e-5, atol=1e-6)

    bsz, seq, vocab = 2, 40, 300
    cond = torch.randn(bsz, seq, vocab, generator=g) * 2
    tokens = torch.full((bsz, seq), vocab, dtype=torch.int64)
    tokens[0, ::3] = 7
    params = MaskGitParams(batch=bsz, seq_len=seq, vocab=vocab, mask_id=vocab, n_base=12, seed=5, offset=1,
                           guidance_scale=0.0, inv_temperature=1.0, noise_scale=2.0, last_step=0)
    a, b = both("unif2ace_maskgit_step", lambda d: [cond, None, 0, tokens, ctypes.byref(params),
                                                    torch.empty_like(tokens), torch.empty_like(tokens),
                                                    torch.empty(bsz, seq)])
    assert torch.equal(a[5], b[5]) and torch.equal(a[6], b[6]) and torch.equal(a[7], b[7])
    a, b = both("unif2ace_philox_noise", lambda d: [11, 3, 1000, 1, torch.empty(1000)])
    assert torch.equal(a[4], b[4])
