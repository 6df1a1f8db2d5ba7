"""D3Diff loss, forward + backward: eager PyTorch (materialised logits, the reference loss) against the fused
`linear_d3diff_loss`, and the reference under torch.compile. Every variant runs in a fresh process, so its
peak memory (tensor memory held above the inputs, and peak RSS, on the CPU; max allocated on CUDA) is its own.

    python -m benchmarks.bench_loss                 # N=8192 H=1024 K=8192, fp32 and bf16, this CPU
    python -m benchmarks.bench_loss --n 2048 --quick
On CUDA (when present) the default sizes are N=8192, H=2048, K=8192 and 58,498.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, rss_mib, run_isolated

VARIANTS = ("eager", "compiled", "fused")


def child(args) -> None:
    from unif2ace.ops import linear_d3diff_loss
    from unif2ace.ops import reference

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = args.device
    kw = dict(alpha=0.01, score="sedd")
    loss_impl = {
        "eager": reference.linear_d3diff_loss,
        "compiled": torch.compile(reference.linear_d3diff_loss, dynamic=False),
        "fused": linear_d3diff_loss,
    }[args.variant]

    def make_step(n, h, k):
        hidden = (torch.randn(n, h, device=device) / h**0.25).to(dtype).requires_grad_()
        weight = (torch.randn(k, h, device=device) / h**0.25).to(dtype).requires_grad_()
        target = torch.randint(0, k, (n,), device=device)
        target[torch.rand(n, device=device) >= args.masked] = -100
        gamma = torch.rand(n, device=device).clamp(min=0.05)

        def step():
            hidden.grad = weight.grad = None
            loss = loss_impl(hidden, weight, target, gamma, **kw)
            loss.backward()
            return loss

        return step

    step = make_step(args.n, args.h, args.k)
    if args.variant == "compiled":
        step()  # compile at the measured shapes outside the measurement (compiler memory is not the op's)
    result = measure_in_child(step, warmup=1, repeat=args.repeat, device=device, prewarm=make_step(64, 64, 64))
    result["loss"] = float(step().item())
    report(result)


def run(n, h, k, dtypes, device, repeat, masked=1.0, variants=VARIANTS, quiet=False):
    rows, results = [], []
    for dtype in dtypes:
        by_variant = {}
        for variant in variants:
            by_variant[variant] = run_isolated(
                "benchmarks.bench_loss",
                ["--child", "--variant", variant, "--dtype", dtype, "--device", device, "--n", str(n), "--h", str(h),
                 "--k", str(k), "--repeat", str(repeat), "--masked", str(masked)],
            )
        base = by_variant["eager"]
        for variant, r in by_variant.items():
            results.append(dict(config=f"N={n} H={h} K={k} {dtype}", n=n, h=h, k=k, dtype=dtype, device=device,
                                variant=variant, **r))
            rows.append([f"{n}x{h}x{k}", dtype, variant, ms(r["time_s"]), f"{r['time_s'] / base['time_s']:.2f}x",
                         mib(r["peak_bytes"]), f"{r['peak_bytes'] / max(1, base['peak_bytes']):.3f}x", rss_mib(r),
                         f"{r['loss']:.5f}"])
    table = format_table(["N x H x K", "dtype", "variant", "fwd+bwd ms", "time vs eager", "peak extra MiB",
                          "memory vs eager", "peak RSS MiB", "loss"], rows)
    if not quiet:
        print(f"D3Diff loss forward+backward on {device} — {machine_line()}")
        print(table)
    return table, results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, default="fused")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--h", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--masked", type=float, default=1.0, help="fraction of rows that are masked (contribute)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    gpu = args.device == "cuda"
    h = args.h or (2048 if gpu else 1024)
    ks = [args.k] if args.k else ([8192, 58498] if gpu else [8192])
    results = []
    for k in ks:
        _, r = run(args.n, h, k, dtypes, args.device, args.repeat, args.masked, variants=args.variants.split(","))
        results += r
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "results": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
