"""The portable build of the CPU kernels against a -march=native build, side by side in one run.

The portable build (the default, UNIF2ACE_CPU_ARCH=portable) carries baseline x86-64, AVX2 and AVX-512 copies of
the CPU kernels and picks one at run time; the native build is compiled for this CPU only. Both modules are built
here with CMake (build/bench-cpu-<variant>/). Each round is one fresh process that loads both modules side by side
and, per workload (loss rows, MaskGIT step, next-token sampling, MoE routing, the MoE layer), points the unif2ace
ops at one module then the other for each timed call, so the two builds see the same machine state call for call
(this machine is shared and noisy). Printed: per-workload medians, and the median ratio portable / native of the
calls made back to back, with the machine and the level the portable build chose. `--levels` adds processes in
which UNIF2ACE_CPU_ISA caps the portable build lower (what CPUs without AVX-512 get).

    python -m benchmarks.bench_cpu_isa --build-only          # build both modules (no timing)
    flock /work/wt/bench.lock python -m benchmarks.bench_cpu_isa --rounds 3
    python -m benchmarks.bench_cpu_isa --levels auto,avx2,baseline   # also the portable build capped lower
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"portable": "portable", "native": "native"}


def module_path(variant: str) -> Path:
    found = sorted((ROOT / "build" / f"bench-cpu-{variant}" / "module").glob("_C*.so"))
    if not found:
        raise FileNotFoundError(f"the {variant} module is not built: run python -m benchmarks.bench_cpu_isa --build-only")
    return found[0]


def build(variant: str) -> Path:
    import pybind11

    build_dir = ROOT / "build" / f"bench-cpu-{variant}"
    gen = ["-G", "Ninja"] if subprocess.run(["which", "ninja"], capture_output=True).returncode == 0 else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DUNIF2ACE_PYTHON=ON", "-DUNIF2ACE_CUDA=OFF", "-DUNIF2ACE_EXAMPLES=OFF",
                    f"-DUNIF2ACE_CPU_ARCH={VARIANTS[variant]}", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                    f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'module'}"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", str(os.cpu_count() or 2)],
                   check=True, capture_output=True)
    return module_path(variant)


def load_module(path: Path, name: str):
    """The extension module at `path`, imported under `name` (ending in `._C`), so two builds can live side by side."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def use(module) -> None:
    """Makes the unif2ace ops call into `module`."""
    import unif2ace._core
    import unif2ace.ops.loss
    import unif2ace.ops.moe
    import unif2ace.ops.sampling

    for m in (unif2ace._core, unif2ace.ops.loss, unif2ace.ops.moe, unif2ace.ops.sampling):
        m._C = module


def workloads(quick: bool):
    """name -> a function making the timed step (built in the child, after the module is loaded)."""
    import torch

    from benchmarks.bench_moe import kernel_routing
    from unif2ace import ops
    from unif2ace.nn import GroupedTokenMoE

    n_rows = 256 if quick else 1024
    tokens = 1024 if quick else 4096
    layer_tokens = 256 if quick else 512  # its matrix products (torch's, the same in both builds) dominate

    def loss(dtype):
        def make():
            g = torch.Generator().manual_seed(0)
            logits = (torch.randn(n_rows, 8192, generator=g) * 3).to(dtype).requires_grad_()
            target = torch.randint(0, 8192, (n_rows,), generator=g)
            gamma = torch.rand(n_rows, generator=g).clamp(min=0.05)

            def step():
                logits.grad = None
                ops.d3diff_loss(logits, target, gamma, score="sedd").backward()

            return step
        return make

    def maskgit(dtype):
        def make():
            g = torch.Generator().manual_seed(0)
            cond = (torch.randn(2, n_rows // 2, 8192, generator=g) * 3).to(dtype)
            uncond = (torch.randn(2, n_rows // 2, 8192, generator=g) * 3).to(dtype)
            tokens_ = torch.full((2, n_rows // 2), 8192, dtype=torch.int64)
            return lambda: ops.maskgit_step(cond, tokens_, 0, 18, uncond_logits=uncond, guidance_scale=5.0,
                                            mask_id=8192, seed=0)
        return make

    def next_token():
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(32, 58498, generator=g) * 3
        return lambda: ops.sample_next_token(logits, temperature=0.8, top_k=50, top_p=0.9, seed=0)

    def routing(dtype):
        def make():
            torch.manual_seed(0)
            x = torch.randn(tokens, 1024).to(dtype).requires_grad_()
            logits = torch.randn(tokens, 16).to(dtype).requires_grad_()
            gid = torch.randint(0, 2, (tokens,))
            dy = torch.randn(tokens, 1024).to(dtype)

            def step():
                x.grad = logits.grad = None
                y, aux = kernel_routing(x, logits, gid, 2, 4)
                ((y * dy).sum() + aux).backward()

            return step
        return make

    def layer():
        torch.manual_seed(0)
        m = GroupedTokenMoE(256, 512, num_groups=2, experts_per_group=8, top_k=4, shared_expert=True)
        with torch.no_grad():
            m.router.normal_(0, 0.1)
        x = torch.randn(2, layer_tokens // 2, 256).requires_grad_()
        gid = torch.arange(2) % 2
        dy = torch.randn_like(x)

        def step():
            m.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = m(x, gid, backend="kernels")
            ((y * dy).sum() + aux).backward()

        return step

    return {
        f"loss rows fwd+bwd [{n_rows}, 8192] fp32": loss(torch.float32),
        f"loss rows fwd+bwd [{n_rows}, 8192] bf16": loss(torch.bfloat16),
        f"maskgit step [2, {n_rows // 2}, 8192] fp32": maskgit(torch.float32),
        f"maskgit step [2, {n_rows // 2}, 8192] bf16": maskgit(torch.bfloat16),
        "next token [32, 58498] top-k/top-p fp32": next_token,
        f"moe routing fwd+bwd T={tokens} H=1024 fp32": routing(torch.float32),
        f"moe routing fwd+bwd T={tokens} H=1024 bf16": routing(torch.bfloat16),
        f"moe layer (kernels) fwd+bwd T={layer_tokens} H=256 fp32": layer,
    }


def child(args) -> None:
    """Both builds in this process, called alternately: per workload, `repeat` pairs of timed calls."""
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # also the kernels' OpenMP team (one libgomp)
    modules = {v: load_module(module_path(v), f"bench_{v}._C") for v in VARIANTS}
    out = {"cpu_isa": {v: m.cpu_isa() for v, m in modules.items()}, "times": {}}
    for name, make in workloads(args.quick).items():
        step = make()
        times = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up of both
            use(modules[v])
            step()
            step()
        for r in range(args.repeat):
            for v in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                use(modules[v])
                t0 = time.perf_counter()
                step()
                times[v].append(time.perf_counter() - t0)
        out["times"][name] = times
    print("RESULT " + json.dumps(out), flush=True)


def run_child(level: str, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("UNIF2ACE_CPU_ISA", None)
    if level != "auto":
        env["UNIF2ACE_CPU_ISA"] = level  # caps the portable build; the native one has a single copy
    cmd = [sys.executable, "-m", "benchmarks.bench_cpu_isa", "--child", "--repeat", str(args.repeat), "--threads",
           str(args.threads)]
    proc = subprocess.run(cmd + (["--quick"] if args.quick else []), capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"level {level} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--build-only", action="store_true", help="build both modules and stop")
    p.add_argument("--no-build", action="store_true", help="use the modules already built")
    p.add_argument("--rounds", type=int, default=3, help="fresh processes (per level)")
    p.add_argument("--repeat", type=int, default=7, help="timed call pairs per workload and process")
    p.add_argument("--levels", default="auto", help="levels of the portable build to time: auto,avx2,baseline")
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: torch's); 1 keeps other processes on a shared machine from stalling a "
                        "parallel region")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if not args.no_build:
        for variant in VARIANTS:
            print(f"building the {variant} module: {build(variant)}", flush=True)
    if args.build_only:
        return

    import torch

    from benchmarks.harness import format_table, machine_line

    levels = args.levels.split(",")
    # times[level][workload][variant]: every timed call of every round; pairs[level][workload]: portable / native
    # of the calls made back to back.
    times, pairs, chosen = {}, {}, {}
    for r in range(args.rounds):
        for level in levels:
            res = run_child(level, args)
            chosen[level] = res["cpu_isa"]["portable"]
            for name, by_variant in res["times"].items():
                t = times.setdefault(level, {}).setdefault(name, {v: [] for v in VARIANTS})
                for v in VARIANTS:
                    t[v] += by_variant[v]
                pairs.setdefault(level, {}).setdefault(name, []).extend(
                    p / n for p, n in zip(by_variant["portable"], by_variant["native"]))
    names = list(times[levels[0]])
    headers = ["workload", "native ms"] + [f"portable ({chosen[level]}) ms" for level in levels] + [
        f"{chosen[level]} / native" for level in levels]
    rows, results = [], []
    for name in names:
        native = statistics.median(t for level in levels for t in times[level][name]["native"])
        portable = [statistics.median(times[level][name]["portable"]) for level in levels]
        ratios = [statistics.median(pairs[level][name]) for level in levels]
        rows.append([name, f"{native * 1e3:.2f}"] + [f"{p * 1e3:.2f}" for p in portable] + [f"{q:.3f}" for q in ratios])
        results.append({"workload": name, "native_s": native,
                        **{f"portable_{chosen[level]}_s": p for level, p in zip(levels, portable)},
                        **{f"ratio_{chosen[level]}": q for level, q in zip(levels, ratios)}})
    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    print(f"CPU kernels, portable build against -march=native, both loaded in each process and called alternately — "
          f"{machine_line()}, {threads}; {args.rounds} processes x {args.repeat} call pairs per workload; medians; ratio: "
          f"median of the back-to-back pairs (torch {torch.__version__})")
    print(format_table(headers, rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_line(), "rows": results,
                                               "times": times, "pairs": pairs}, indent=1))


if __name__ == "__main__":
    main()
