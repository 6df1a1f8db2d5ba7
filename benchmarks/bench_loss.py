"""D3Diff loss, forward + backward: eager PyTorch (materialised logits, the reference loss) against the fused
`linear_d3diff_loss`, the reference under torch.compile, and two anchors at α = 0 (plain masked cross-entropy):
cut-cross-entropy's `linear_cross_entropy` (`impl="torch_compile"` on the CPU, its Triton kernels on CUDA) and
Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (CUDA only). An anchor whose package (or GPU) is missing is listed
as "not run" with the reason.

    python -m benchmarks.bench_loss                 # N=8192 H=1024 K=8192, fp32 and bf16, this CPU
    python -m benchmarks.bench_loss --n 2048 --quick
    python -m benchmarks.bench_loss --device cuda   # N=8192 H=2048, K=8192 and 58,498, + checks and a GEMM probe

On the CPU every variant runs in a fresh process, so its peak memory (tensor memory held above the inputs and the
previous step's gradients, and peak RSS) is its own. On CUDA all variants of one dtype run side by side in one
process; peak memory is max_memory_allocated above what is held before the measured step (inputs, weights and the
previous step's gradients, which the step releases first), timing the median of 5 steps after 2 warm-ups. On CUDA the
run also checks that the fused loss and gradients agree with cut-cross-entropy and Liger at α = 0 and with the fp64
reference at α > 0, and times the logits GEMM written through a padded-row view against a contiguous output.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, median_time, mib, ms, report, rss_mib

VARIANTS = ("eager", "compiled", "fused", "fused-rows", "cce", "liger")
CPU_VARIANTS = ("eager", "compiled", "fused", "cce", "liger")
GPU_VARIANTS = ("eager", "fused", "fused-rows", "cce", "liger")
ANCHORS = ("cce", "liger")  # plain cross-entropy (α = 0)
LOSS_KW = dict(alpha=0.01, score="sedd")


class NotRun(Exception):
    """A variant that cannot run here (missing package or device); the message says why."""


def loss_fn(variant: str, device: str):
    """(hidden, weight, target, gamma) -> loss of one variant."""
    from unif2ace.ops import linear_d3diff_loss, reference

    if variant == "eager":
        return lambda h, w, t, g: reference.linear_d3diff_loss(h, w, t, g, **LOSS_KW)
    if variant == "compiled":
        return torch.compile(lambda h, w, t, g: reference.linear_d3diff_loss(h, w, t, g, **LOSS_KW), dynamic=False)
    if variant == "fused":
        return lambda h, w, t, g: linear_d3diff_loss(h, w, t, g, **LOSS_KW)
    if variant == "fused-rows":
        return lambda h, w, t, g: linear_d3diff_loss(h, w, t, g, strategy="rows", **LOSS_KW)
    if variant == "cce":
        return cce_fn(device)
    if variant == "liger":
        return liger_fn(device)
    raise ValueError(variant)


def cce_fn(device: str, filter_eps="high"):
    if device == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:  # noqa: BLE001 - any import failure means "not run"
            raise NotRun(f"cut-cross-entropy not importable ({type(exc).__name__}: {exc})") from exc
        return lambda h, w, t, g: linear_cross_entropy(h, w, t, filter_eps=filter_eps)
    try:  # its torch_compile implementation needs no Triton
        from cut_cross_entropy.torch_compile import torch_compile_linear_cross_entropy
    except Exception as exc:  # noqa: BLE001
        raise NotRun(f"cut-cross-entropy not importable ({type(exc).__name__}: {exc})") from exc
    return lambda h, w, t, g: torch_compile_linear_cross_entropy(h, w, t)


def liger_fn(device: str):
    if device != "cuda":
        raise NotRun("Liger-Kernel's fused loss is Triton code: needs a CUDA device")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001
        raise NotRun(f"Liger-Kernel not importable ({type(exc).__name__}: {exc})") from exc
    module = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return lambda h, w, t, g: module(w, h, t)


def make_inputs(n, h, k, dtype, device, masked=1.0, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = (torch.randn(n, h, device=device, generator=gen) / h**0.25).to(dtype).requires_grad_()
    weight = (torch.randn(k, h, device=device, generator=gen) / h**0.25).to(dtype).requires_grad_()
    target = torch.randint(0, k, (n,), device=device, generator=gen)
    target[torch.rand(n, device=device, generator=gen) >= masked] = -100
    gamma = torch.rand(n, device=device, generator=gen).clamp(min=0.05)
    return hidden, weight, target, gamma


def make_step(fn, inputs):
    hidden, weight, target, gamma = inputs

    def step():
        hidden.grad = weight.grad = None  # the previous step's gradients are released by the step, as in training
        loss = fn(hidden, weight, target, gamma)
        loss.backward()
        return loss

    return step


def measure_cuda(step) -> dict:
    """Peak memory above what is held before a step that follows a complete step (so the previous gradients are in
    the baseline), and the median time of 5 steps after 2 warm-ups."""
    step()
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    t = median_time(step, warmup=0, repeat=5, device="cuda")
    return {"time_s": t, "peak_bytes": max(0, peak), "loss": float(loss.item())}


def child(args) -> None:
    """CPU: one variant. CUDA: every requested variant and K of one dtype, side by side in this process."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = args.device
    variants = args.variants.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    for k in ks:
        for variant in variants:
            row = dict(variant=variant, k=k)
            try:
                fn = loss_fn(variant, device)
                if device == "cuda":
                    inputs = make_inputs(args.n, args.h, k, dtype, device, args.masked)
                    row.update(measure_cuda(make_step(fn, inputs)))
                else:
                    inputs = make_inputs(args.n, args.h, k, dtype, device, args.masked)
                    step = make_step(fn, inputs)
                    if variant in ("compiled", "cce"):
                        step()  # compile at the measured shapes outside the measurement
                    small = make_step(fn, make_inputs(64, 64, 64, dtype, device))
                    row.update(measure_in_child(step, warmup=1, repeat=args.repeat, device=device, prewarm=small))
                    row["loss"] = float(step().item())
            except NotRun as exc:
                row["not_run"] = str(exc)
            except Exception as exc:  # noqa: BLE001 - a failing anchor must not hide the other rows
                row["not_run"] = f"failed: {type(exc).__name__}: {exc}"[:300]
            report(row)
            inputs = fn = step = small = None  # noqa: F841 - release before the next variant
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    if device == "cuda" and args.check:
        for row in agreement(args, dtype):
            report(dict(check=True, **row))
    if device == "cuda" and args.probe:
        for row in gemm_probe():
            report(dict(probe=True, **row))


def run_child(argv: list[str]) -> list[dict]:
    """Runs a child process and returns every RESULT line it printed."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_loss", *argv], capture_output=True, text=True,
                         env=env, timeout=1800)
    rows = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0:
        raise RuntimeError(f"bench_loss {' '.join(argv)} failed:\n{out.stdout}\n{out.stderr}")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Agreement with the anchors and with fp64 (CUDA)
# ----------------------------------------------------------------------------------------------------------
def _loss_and_grads(fn, inputs):
    hidden, weight, target, gamma = inputs
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, target, gamma)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return [loss.detach().double().cpu(), gh.double().cpu(), gw.double().cpu()]


def _rel(a, b):
    """max |a − b| / max |b|: the error of a tensor relative to its scale."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def agreement(args, dtype) -> list[dict]:
    """Loss, dH and dW of the fused loss against cut-cross-entropy and Liger at α = 0, and against the fp64
    reference (with the error eager PyTorch makes in the same dtype beside it) at α = 0.01 (sedd), at N=2048."""
    from unif2ace.ops import linear_d3diff_loss, reference

    n, h, k = 2048, args.h, max(int(x) for x in args.ks.split(","))
    inputs = make_inputs(n, h, k, dtype, "cuda", args.masked, seed=1)
    exact = [t.detach().double().requires_grad_() if t.is_floating_point() else t for t in inputs]
    rows = []
    for alpha in (0.0, 0.01):
        kw = dict(alpha=alpha, score="sedd")
        truth = _loss_and_grads(lambda a, b, c, d: reference.linear_d3diff_loss(a, b, c, d, **kw), exact)
        eager = _loss_and_grads(lambda a, b, c, d: reference.linear_d3diff_loss(a, b, c, d, **kw), inputs)
        fused = _loss_and_grads(lambda a, b, c, d: linear_d3diff_loss(a, b, c, d, **kw), inputs)
        others = {"eager": eager}
        if alpha == 0:
            for name, make in (("cce", lambda: cce_fn("cuda", filter_eps=None)), ("liger", lambda: liger_fn("cuda"))):
                try:
                    others[name] = _loss_and_grads(make(), inputs)
                except Exception as exc:  # noqa: BLE001
                    rows.append(dict(alpha=alpha, against=name, not_run=str(exc)[:200]))
        for name, result in others.items():
            rows.append(dict(alpha=alpha, against=name, n=n, h=h, k=k, dtype=str(dtype).split(".")[-1],
                             loss=[r[0].item() for r in (fused, result, truth)],
                             fused_vs_other=[_rel(a, b) for a, b in zip(fused, result)],
                             fused_vs_fp64=[_rel(a, b) for a, b in zip(fused, truth)],
                             other_vs_fp64=[_rel(a, b) for a, b in zip(result, truth)]))
    return rows


# ----------------------------------------------------------------------------------------------------------
# GEMM probe: logits written through a padded-row view vs a contiguous output (CUDA, bf16)
# ----------------------------------------------------------------------------------------------------------
def gemm_probe(h=2048, k=58498, rows=(384, 512, 8192)) -> list[dict]:
    kpad = -(-k // 64) * 64
    w = torch.randn(k, h, device="cuda", dtype=torch.bfloat16)
    out = []
    for m in rows:
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        contiguous = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        padded = torch.empty(m, kpad, device="cuda", dtype=torch.bfloat16)[:, :k]
        gh = torch.empty(m, h, device="cuda", dtype=torch.bfloat16)
        gw = torch.empty(k, h, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * h * k
        row = dict(m=m, h=h, k=k)
        for name, z in (("contiguous", contiguous), ("padded", padded)):
            z.normal_()
            row[f"logits_{name}_tflops"] = flop / median_time(lambda: torch.mm(x, w.t(), out=z), warmup=3, repeat=10,
                                                              device="cuda") / 1e12
            row[f"dh_{name}_tflops"] = flop / median_time(lambda: torch.mm(z, w, out=gh), warmup=3, repeat=10,
                                                          device="cuda") / 1e12
            row[f"dw_{name}_tflops"] = flop / median_time(lambda: torch.mm(z.t(), x, out=gw), warmup=3, repeat=10,
                                                          device="cuda") / 1e12
        out.append(row)
        del x, contiguous, padded, gh, gw
    return out


# ----------------------------------------------------------------------------------------------------------
# Parent: tables
# ----------------------------------------------------------------------------------------------------------
TARGETS = {  # (dtype, K): (time vs eager, time vs Liger, memory vs Liger) upper bounds from the issue
    ("bfloat16", 58498): (0.6, 0.6, 1.0),
    ("float32", 8192): (0.8, None, 1.0),
}


def run(n, h, ks, dtypes, device, repeat, masked=1.0, variants=None, quiet=False, check=True, probe=True):
    variants = list(variants or (GPU_VARIANTS if device == "cuda" else CPU_VARIANTS))
    rows, results, lines = [], [], []
    for dtype in dtypes:
        common = ["--child", "--dtype", dtype, "--device", device, "--n", str(n), "--h", str(h), "--repeat",
                  str(repeat), "--masked", str(masked)]
        if device == "cuda":  # one process per dtype, all variants side by side
            # "fused-rows" is what "fused" already runs for fp32 weights.
            here = [v for v in variants if not (v == "fused-rows" and dtype == "float32")]
            out = run_child(common + ["--variants", ",".join(here), "--ks", ",".join(map(str, ks))]
                            + (["--check"] if check else []) + (["--probe"] if probe and dtype == "bfloat16" else []))
        else:
            out = [r for k in ks for v in variants
                   for r in run_child(common + ["--variants", v, "--ks", str(k)])]
        measured = [r for r in out if not r.get("check") and not r.get("probe")]
        for k in ks:
            by_variant = {r["variant"]: r for r in measured if r["k"] == k}
            base = by_variant.get("eager", {})
            liger = by_variant.get("liger", {})
            for variant, r in by_variant.items():
                config = f"N={n} H={h} K={k} {dtype}"
                results.append(dict(config=config, n=n, h=h, dtype=dtype, device=device,
                                    **{key: value for key, value in r.items()}))
                if "not_run" in r:
                    rows.append([f"{n}x{h}x{k}", dtype, variant, "not run: " + r["not_run"], "", "", "", "", "", "",
                                 ""])
                    continue
                alpha = "0" if variant in ANCHORS else str(LOSS_KW["alpha"])

                def ratio(key, other):
                    return f"{r[key] / other[key]:.2f}x" if other.get(key) else "-"

                rows.append([f"{n}x{h}x{k}", dtype, variant, ms(r["time_s"]), ratio("time_s", base),
                             ratio("time_s", liger), mib(r["peak_bytes"]),
                             f"{r['peak_bytes'] / max(1, base.get('peak_bytes', 0)):.3f}x" if base else "-",
                             ratio("peak_bytes", liger), rss_mib(r), f"{r['loss']:.5f} (α={alpha})"])
            target = TARGETS.get((dtype, k))
            fused = by_variant.get("fused", {})
            if device == "cuda" and target and "time_s" in fused:
                lines.append(verdict(dtype, k, fused, base, liger, target))
        checks = [r for r in out if r.get("check")]
        if checks:
            lines.append(agreement_table(checks))
        probes = [r for r in out if r.get("probe")]
        if probes:
            lines.append(probe_table(probes))
    table = format_table(["N x H x K", "dtype", "variant", "fwd+bwd ms", "time vs eager", "time vs Liger",
                          "peak extra MiB", "memory vs eager", "memory vs Liger", "peak RSS MiB", "loss"], rows)
    text = "\n\n".join([table] + lines)
    if not quiet:
        print(f"D3Diff loss forward+backward on {device} — {machine_line()}")
        print(text)
    return text, results


def verdict(dtype, k, fused, eager, liger, target) -> str:
    vs_eager, vs_liger, mem_liger = target
    parts = []

    def check(name, value, bound):
        if value is None:
            parts.append(f"{name}: not measured")
        else:
            parts.append(f"{name} {value:.2f}x (target <= {bound}x: {'met' if value <= bound else 'NOT met'})")

    if vs_eager:
        check("time vs eager", fused["time_s"] / eager["time_s"] if eager.get("time_s") else None, vs_eager)
    if vs_liger:
        check("time vs Liger", fused["time_s"] / liger["time_s"] if liger.get("time_s") else None, vs_liger)
    if mem_liger:
        check("memory vs Liger", fused["peak_bytes"] / liger["peak_bytes"] if liger.get("peak_bytes") else None,
              mem_liger)
    return f"Targets at K={k} {dtype}: " + "; ".join(parts)


def agreement_table(checks) -> str:
    rows = []
    for c in checks:
        if "not_run" in c:
            rows.append([c["alpha"], c["against"], "not run: " + c["not_run"], "", "", ""])
            continue
        names = ("loss", "dH", "dW")
        rows.append([c["alpha"], c["against"], " / ".join(f"{x:.6f}" for x in c["loss"]),
                     " ".join(f"{nm} {v:.1e}" for nm, v in zip(names, c["fused_vs_other"])),
                     " ".join(f"{nm} {v:.1e}" for nm, v in zip(names, c["fused_vs_fp64"])),
                     " ".join(f"{nm} {v:.1e}" for nm, v in zip(names, c["other_vs_fp64"]))])
    c0 = next(c for c in checks if "n" in c) if any("n" in c for c in checks) else {}
    head = (f"Agreement at N={c0.get('n')} H={c0.get('h')} K={c0.get('k')} {c0.get('dtype')} (max |a − b| / max |b|; "
            "loss: fused / other / fp64):")
    return head + "\n" + format_table(["α", "other", "loss", "fused vs other", "fused vs fp64", "other vs fp64"],
                                      rows)


def probe_table(probes) -> str:
    rows = []
    for p in probes:
        rows.append([p["m"], *(f"{p[f'{g}_{kind}_tflops']:.0f}" for g in ("logits", "dh", "dw")
                               for kind in ("contiguous", "padded"))])
    head = (f"GEMM probe, bf16 H={probes[0]['h']} K={probes[0]['k']} (TFLOP/s): logits written contiguous [M, K] vs "
            "into a view of [M, K rounded up to 64]; dH and dW read the same layouts")
    return head + "\n" + format_table(["M", "logits contiguous", "logits padded", "dH contiguous", "dH padded",
                                       "dW contiguous", "dW padded"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ks", default="", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--masked", type=float, default=1.0, help="fraction of rows that are masked (contribute)")
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS)
                   + " (default: CPU " + ",".join(CPU_VARIANTS) + "; CUDA " + ",".join(GPU_VARIANTS) + ")")
    p.add_argument("--no-check", action="store_true", help="CUDA: skip the agreement check and the GEMM probe")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    gpu = args.device == "cuda"
    h = args.h or (2048 if gpu else 1024)
    ks = [args.k] if args.k else ([8192, 58498] if gpu else [8192])
    variants = args.variants.split(",") if args.variants else None
    _, results = run(args.n, h, ks, dtypes, args.device, args.repeat, args.masked, variants=variants,
                     check=not args.no_check, probe=not args.no_check)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "results": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
