"""One MaskGIT step with classifier-free guidance: the eager Show-o step against the fused op.

Eager (what Show-o's t2i loop, Showo.t2i_generate, does per step; docs/design.md §6): guidance (1+g)·c − g·u in the
logits dtype, softmax over [B, N, K], torch.multinomial for every position, gather of the drawn probabilities, log +
annealed Gumbel, a full sort of every row's confidences and a gather at the cut-off.
Fused: unif2ace.ops.maskgit_step (one read of each logit, no probability matrix, selection instead of sort).
Both at the first step (every position masked: the most work the fused kernel can have; it skips the logits of
already known positions at later steps, the eager step does not).

    python -m benchmarks.bench_sampling [--sizes 256,1024] [--dtype float32] [--repeat 5] [--device cpu|cuda] [--json F]

Measured with `python -m benchmarks.bench_sampling --repeat 5` (AMD EPYC, 2 threads, torch 2.13.0+cpu, on a
shared machine with a load average of about 6.5, so absolute times are noisy; the eager time is dominated by
torch.multinomial, then the guidance arithmetic and the softmax; peak = extra resident memory of the step):

| B | N    | K    | dtype    | eager Show-o (ms) | fused (ms) | speed-up | eager peak MiB | fused peak MiB |
|---|------|------|----------|-------------------|------------|----------|----------------|----------------|
| 8 | 256  | 8192 | float32  | 2483.5            | 120.0      | 20.7x    | 191.8          | 0.1            |
| 8 | 256  | 8192 | bfloat16 | 2347.3            | 108.1      | 21.7x    | 95.8           | 0.1            |
| 8 | 1024 | 8192 | float32  | 8880.6            | 372.0      | 23.9x    | 767.9          | 0.1            |
| 8 | 1024 | 8192 | bfloat16 | 7221.7            | 307.9      | 23.5x    | 384.0          | 0.1            |

On CUDA (B = 8, N = 1024, K = 8192 by default) the table adds the HBM floor: the time to read the cond and
uncond logits once at the device's measured copy bandwidth (a 1 GiB device-to-device copy, read + write bytes per
second), the device time of each step (20 calls back to back between CUDA events, so without the host's launch
overhead) and the fused step's share of the floor (floor / device time; the target is >= 60 %).
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from unif2ace import ops

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, rss_mib, run_isolated


def eager_showo_step(cond, uncond, tokens, step, num_steps, guidance, mask_id, generator):
    B, N, K = cond.shape
    logits = (1 + guidance) * cond - guidance * uncond
    probs = logits.softmax(dim=-1)
    sampled = torch.multinomial(probs.view(-1, K), 1, generator=generator).view(B, N)
    unknown = tokens == mask_id
    sampled = torch.where(unknown, sampled, tokens)
    r = (step + 1) / num_steps
    mask_ratio = math.cos(math.pi / 2 * r)
    selected = torch.gather(probs, -1, sampled[..., None]).squeeze(-1).float()
    selected = torch.where(unknown, selected, torch.finfo(torch.float32).max)
    mask_len = torch.tensor([math.floor(N * mask_ratio)], device=cond.device)
    mask_len = torch.maximum(torch.ones_like(mask_len), torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len))
    u = torch.rand(B, N, generator=generator, device=cond.device).clamp_(1e-20, 1.0)
    confidence = torch.log(selected) + 1.0 * (1 - r) * -torch.log(-torch.log(u))
    sorted_conf = torch.sort(confidence, dim=-1).values
    cut_off = torch.gather(sorted_conf, 1, mask_len.long())
    masking = confidence < cut_off
    return torch.where(masking, mask_id, sampled), sampled


VARIANTS = ("eager", "fused")


def copy_bandwidth() -> float:
    """Bytes per second (read + write) of a 1 GiB device-to-device copy, median of 10."""
    from benchmarks.harness import median_time

    x = torch.empty(2**28, device="cuda")
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), warmup=3, repeat=10, device="cuda")
    return 2 * x.numel() * 4 / t


def child(args) -> None:
    """One variant at one size in this (fresh) process: time and the peak memory the step adds."""
    device, dtype = args.device, getattr(torch, args.dtype)
    B, N, K, g, S, step = args.batch, args.n, args.codebook, args.guidance, 18, 0

    def make_step(b, n, k):
        gen = torch.Generator(device=device).manual_seed(0)
        cond = torch.randn(b, n, k, generator=gen, device=device).mul_(3).to(dtype)
        uncond = torch.randn(b, n, k, generator=gen, device=device).mul_(3).to(dtype)
        tokens = torch.full((b, n), k, dtype=torch.int64, device=device)
        if args.variant == "eager":
            return lambda: eager_showo_step(cond, uncond, tokens, step, S, g, k, gen)
        return lambda: ops.maskgit_step(cond, tokens, step, S, uncond_logits=uncond, guidance_scale=g, mask_id=k,
                                        seed=0, offset=step)

    fn = make_step(B, N, K)
    result = measure_in_child(fn, warmup=1, repeat=args.repeat, device=device, prewarm=make_step(1, 8, 64))
    if device == "cuda":
        result["gpu_s"] = back_to_back_gpu_time(fn)
    report(result)


def back_to_back_gpu_time(fn, calls: int = 20) -> float:
    """Seconds per call of `calls` calls issued back to back between two CUDA events (median of 5 such runs): the
    device time of the step, without the host's launch overhead or a synchronisation per call."""
    import statistics

    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, default="fused", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="comma-separated N values")
    ap.add_argument("--codebook", type=int, default=8192)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.batch = args.batch or 8
    if args.child:
        return child(args)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1024] if cuda else [256, 1024])
    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    B, K = args.batch, args.codebook
    print(f"# MaskGIT step with guidance {args.guidance}: eager Show-o step vs fused unif2ace.ops.maskgit_step")
    print(f"# {machine_line()}; device {args.device}; median of {args.repeat} runs after 1 warm-up; each variant in "
          "a fresh process (peak = memory the step adds)\n")
    bandwidth = copy_bandwidth() if cuda else None
    if bandwidth:
        print(f"# device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)\n")
    rows, results = [], []
    for N in sizes:
        for dtype in dtypes:
            r = {}
            for variant in VARIANTS:
                r[variant] = run_isolated(
                    "benchmarks.bench_sampling",
                    ["--child", "--variant", variant, "--n", str(N), "--dtype", dtype, "--device", args.device,
                     "--batch", str(B), "--codebook", str(K), "--guidance", str(args.guidance),
                     "--repeat", str(args.repeat)],
                )
                results.append(dict(config=f"B={B} N={N} K={K} {dtype}", b=B, n=N, k=K, dtype=dtype,
                                    device=args.device, variant=variant, **r[variant]))
            e, f = r["eager"], r["fused"]
            row = [B, N, K, dtype, ms(e["time_s"]), ms(f["time_s"]), f"{e['time_s'] / f['time_s']:.1f}x",
                   mib(e["peak_bytes"]), mib(f["peak_bytes"]), rss_mib(e), rss_mib(f)]
            if bandwidth:
                floor = 2 * B * N * K * torch.finfo(getattr(torch, dtype)).bits / 8 / bandwidth
                results[-1].update(floor_s=floor, floor_share=floor / f["gpu_s"])
                row += [f"{e['gpu_s'] * 1e3:.3f}", f"{f['gpu_s'] * 1e3:.3f}", f"{floor * 1e3:.3f}",
                        f"{100 * floor / f['gpu_s']:.0f}%"]
            rows.append(row)
    print(format_table(["B", "N", "K", "dtype", "eager Show-o (ms)", "fused (ms)", "speed-up", "eager peak MiB",
                        "fused peak MiB", "eager peak RSS MiB", "fused peak RSS MiB"]
                       + (["eager GPU ms", "fused GPU ms", "HBM floor (ms)", "fused share of floor"] if bandwidth
                          else []), rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine_line(), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
