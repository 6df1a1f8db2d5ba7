"""Runs every benchmark and writes one report: `python -m benchmarks [--quick] [--gpu] [--only loss,moe]`.

Each benchmark script runs in its own process and writes JSON rows (config, variant, time_s, peak_bytes, ...);
the first variant of each config is its baseline. The report (Markdown + JSON + PNG plots) goes to
benchmarks/results/: cpu.md / cpu.json / cpu-*.png on the CPU, gpu-h100.md / gpu-h100.json / gpu-*.png on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import device_ceilings, machine_info, machine_line

HERE = Path(__file__).resolve().parent

# name -> (module, CPU arguments, quick CPU arguments, GPU arguments); None: not run there
BENCHMARKS = {
    "loss": ("benchmarks.bench_loss", ["--repeat", "2", "--dtype", "float32"], ["--n", "2048", "--dtype", "float32"],
             ["--device", "cuda", "--dtype", "float32"]),
    # bf16 matrix products are ~8x slower than fp32 on CPUs without bf16 instructions: a smaller N on the CPU,
    # and no torch.compile row (inductor spent over 5 minutes compiling the bf16 graph on this CPU).
    "loss_bf16": ("benchmarks.bench_loss", ["--n", "2048", "--repeat", "1", "--dtype", "bfloat16",
                                            "--variants", "eager,fused,cce,liger"],
                  ["--n", "512", "--dtype", "bfloat16", "--repeat", "1"], ["--device", "cuda", "--dtype", "bfloat16"]),
    "sampling": ("benchmarks.bench_sampling", ["--repeat", "3"], ["--sizes", "256", "--dtype", "float32",
                                                                   "--repeat", "3"], ["--device", "cuda"]),
    # fp32: three alternating rounds, since the layer comparison sits near parity (both sides are the same matrix
    # products) and one run on a shared machine swings by +-15%; bf16 (20 s per layer step here): one round.
    "moe": ("benchmarks.bench_moe", ["--repeat", "3", "--dtype", "float32", "--rounds", "3"],
            ["--tokens", "2048", "--dtype", "float32", "--repeat", "2"], ["--device", "cuda", "--dtype", "float32"]),
    "moe_bf16": ("benchmarks.bench_moe", ["--repeat", "3", "--dtype", "bfloat16"],
                 ["--tokens", "2048", "--dtype", "bfloat16", "--repeat", "2"], ["--device", "cuda", "--dtype",
                                                                                 "bfloat16"]),
    "train_step": ("benchmarks.bench_model_step", ["--repeat", "2"], ["--presets", "tiny", "--repeat", "2"],
                   ["--device", "cuda", "--presets", "small,medium", "--variants", "reference,kernels,kernels+recompute"]),
    # Generation: decode tokens/s and first-token latency (8 rows with an image), images/s for 1, 8, 32 prompts
    # (18 steps, guidance 3); the paper preset in bf16 on the GPU, the small preset on the CPU.
    "generate": ("benchmarks.bench_generate", [], ["--preset", "tiny", "--repeat", "1"],
                 ["--device", "cuda", "--repeat", "1"]),
    # The paper preset at 16,296 real tokens per step (56 rows): tokens/s, peak memory and MFU; then 20 steps of the
    # faster step against the plain one (losses within bf16 rounding). GPU only. (Compiled blocks add ~1 min of
    # compilation per process: `--variants kernels,kernels+flex+fused+compile` measures them.)
    "train_paper": ("benchmarks.bench_model_step", None, None,
                    ["--device", "cuda", "--presets", "paper", "--batch", "56", "--no-largest", "--repeat", "2",
                     "--variants", "reference,kernels,kernels+flex+fused"]),
    "train_loss": ("benchmarks.bench_model_step", None, None,
                   ["--device", "cuda", "--presets", "medium", "--batch", "16", "--loss-check", "20",
                    "--variants", "kernels,kernels+flex+fused"]),
}


def run_one(module, args, json_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", module, *args, "--json", json_path], capture_output=True, text=True,
                          env=env)
    return proc, time.time() - t0


def plot(rows, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    for r in rows:  # rows without a config label are grouped by their dtype
        r.setdefault("config", str(r.get("dtype", "")))
    configs = []
    for r in rows:
        if r["config"] not in configs:
            configs.append(r["config"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 + 0.55 * max(4, len(rows))))
    for ax, key, label in ((axes[0], "time_s", "speed-up vs baseline (higher is better)"),
                           (axes[1], "peak_bytes", "peak memory vs baseline (lower is better)")):
        labels, values = [], []
        for c in configs:
            group = [r for r in rows if r["config"] == c]
            base = group[0]
            for r in group[1:]:
                if r.get(key) is None or not base.get(key):
                    continue
                ratio = base[key] / r[key] if key == "time_s" else r[key] / base[key]
                labels.append(f"{c}\n{r['variant']} vs {base['variant']}")
                values.append(ratio)
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="GPU sizes and baselines (needs CUDA)")
    p.add_argument("--quick", action="store_true", help="small CPU sizes (a smoke run)")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    p.add_argument("--results", default=str(HERE / "results"))
    args = p.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        p.error("--gpu needs a CUDA device")
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu-h100" if args.gpu else ("cpu-quick" if args.quick else "cpu")

    report = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "benchmarks": {}, "sections": {}}
    # With --only, the other benchmarks' sections of an earlier report are kept (each says when it ran).
    earlier = {}
    if args.only and (out / f"{stem}.json").exists():
        earlier = json.loads((out / f"{stem}.json").read_text())
    md_head = [f"# Benchmarks ({'GPU' if args.gpu else 'CPU'})", "",
               f"Run {report['when']} on: {machine_line()}" + (f" (sections not rerun: {earlier.get('when')})"
                                                              if earlier else "") + ".", "",
          "Reproduce: `python -m benchmarks" + (" --gpu" if args.gpu else (" --quick" if args.quick else "")) + "`.",
          "Every variant runs in a fresh process; peak memory is the tensor memory the measured step holds at its "
          "peak above what was held before it (the allocator's running total, from the profiler's allocation events "
          "on the CPU; max allocated on CUDA). CPU tables also give the peak RSS the step adds, which includes what "
          "glibc keeps of freed memory. Ratios are against the first row of each configuration.", ""]
    if args.gpu:
        ceilings = device_ceilings()
        report["ceilings"] = ceilings
        md_head += [f"Measured ceilings: bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, "
                    f"device copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s.", ""]

    def write_report():
        md = list(md_head)
        for name in BENCHMARKS:
            for source in (report, earlier):
                if name in source.get("sections", {}):
                    md += source["sections"][name]
                    report["sections"].setdefault(name, source["sections"][name])
                    report["benchmarks"].setdefault(name, source["benchmarks"].get(name, []))
                    break
        (out / f"{stem}.md").write_text("\n".join(md))
        (out / f"{stem}.json").write_text(json.dumps(report, indent=2))

    failures = 0
    for name in names:
        module, cpu_args, quick_args, gpu_args = BENCHMARKS[name]
        bench_args = gpu_args if args.gpu else (quick_args if args.quick else cpu_args)
        if bench_args is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            json_path = os.path.join(tmp, "rows.json")
            print(f"== {name}: python -m {module} {' '.join(bench_args)}", flush=True)
            proc, wall = run_one(module, bench_args, json_path)
            print(proc.stdout, flush=True)
            if proc.returncode != 0:
                failures += 1
                print(proc.stderr, file=sys.stderr)
                report["sections"][name] = [f"## {name}", "", f"FAILED (exit {proc.returncode}); see the log.", ""]
                continue
            with open(json_path) as f:
                data = json.load(f)
        rows = data["results"]
        report["benchmarks"][name] = rows
        png = plot(rows, out / f"{stem}-{name}.png", f"{name} — {machine_line()}")
        section = [f"## {name}", "", f"`python -m {module} {' '.join(bench_args)}` ({wall:.0f} s, run "
                   f"{report['when']})", "", "```", proc.stdout.strip(), "```", ""]
        if png:
            section += [f"![{name}]({png.name})", ""]
        report["sections"][name] = section
        # Written after every benchmark, so an interrupted run keeps what it measured.
        write_report()
    write_report()
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
