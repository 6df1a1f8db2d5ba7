"""Grouped MoE, forward + backward, every variant in a fresh process (peak memory = the tensor memory it holds above
its inputs at the peak, and on the CPU also its peak RSS; see benchmarks.harness).

(a) routing: gate + dispatch + combine (identity experts, so only the routing is timed) — the fused ops against
    the eager code a user would write (masked softmax, topk, renormalise, bincount, stable argsort,
    index_select, index_add_);
(b) the whole GroupedTokenMoE layer (2 groups × 8 experts + shared experts, top-4): backend="kernels" against
    backend="reference" (the per-expert loop), plus the largest difference between their outputs and input
    gradients.

    python -m benchmarks.bench_moe                  # T=8192 H=512 F=256, fp32 and bf16, this CPU
    python -m benchmarks.bench_moe --dtype float32 --rounds 3   # alternating fresh-process rounds, medians
    python -m benchmarks.bench_moe --tokens 2048 --repeat 2
On CUDA (when present) the default sizes are T=16384, H=2048, F=1024, the layer also runs with recompute=True
("kernels+recompute"), and every row gets its floor from ceilings measured in the same run on the same device
(benchmarks.harness.device_ceilings): the layer's GEMM floor = the FLOPs of its routed, shared and router products,
forward and backward (12·T·k·H·F + 12·T·H·F_s + 6·T·H·G·E), at the measured dense bf16 matmul rate; the routing's
bandwidth floor = the bytes gate + sort + dispatch + combine must move forward and backward (_routing_bytes) at the
measured device-copy bandwidth. "share of floor" = floor / measured time. Without a CUDA device the run ends with a
line saying the GPU rows were not run. `bash benchmarks/gpu_check.sh` runs this at GPU sizes (bf16 and fp32) in
its benchmark stage.

Latest CPU results: benchmarks/results/cpu.md (sections moe and moe_bf16). Measured with
`python -m benchmarks.bench_moe --repeat 3 --dtype float32 --rounds 3` on a shared 2-core VM:

    | what                                     | variant   | fwd+bwd ms | speed-up | peak extra MiB | memory ratio |
    |------------------------------------------|-----------|------------|----------|----------------|--------------|
    | gate+dispatch+combine                    | eager     | 275.8      | 1.00x    | 257.3          | 1.00x        |
    | gate+dispatch+combine                    | kernels   | 131.4      | 2.10x    | 144.3          | 0.56x        |
    | same, both with THP_MEM_ALLOC_ENABLE=1   | eager     | 144.4      | 1.00x    | 257.3          | 1.00x        |
    | same, both with THP_MEM_ALLOC_ENABLE=1   | kernels   | 81.3       | 1.78x    | 144.3          | 0.56x        |
    | GroupedTokenMoE                          | reference | 835.7      | 1.00x    | 312.4          | 1.00x        |
    | GroupedTokenMoE                          | kernels   | 867.5      | 0.96x    | 100.0          | 0.32x        |

The layer sits at parity because both backends run the same expert matrix products (77% of its time); its median
over three rounds has ranged from 0.96x to 1.16x between runs, and an interleaved in-process A/B gives 1.08-1.09x.

On this VM a fresh 64 MiB buffer costs ~25 ms to fault in (4 ms to fill once faulted), and glibc maps every
[T·k, H] tensor afresh, so the routing ratio mostly counts buffers: the dispatch/combine ops need two per step, the
eager code about five. On the CPU the routing comparison therefore runs a second time with torch's huge-page
allocator (THP_MEM_ALLOC_ENABLE=1) on both sides, where a fresh buffer costs ~9 ms: that row pair is the ratio of
the work itself (--no-huge-page-control skips it). The layer keeps none of those buffers (ops.moe_experts), hence
its memory ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, rss_mib, run_isolated

ROUTING = ("eager", "kernels")
LAYER = ("reference", "kernels")
LAYER_GPU = ("reference", "kernels", "kernels+recompute")


def _layer_flops(args) -> float:
    """Matrix-product FLOPs of one GroupedTokenMoE step, forward and backward (the backward doing twice the forward's
    products): routed experts 2 products of 2·H·F per (token, slot), the shared expert 2 of 2·H·F per token, the
    router 2·H·G·E per token."""
    t, h, f, k, ne = args.tokens, args.hidden, args.expert_hidden, args.top_k, 2 * args.experts
    return 3 * (4 * t * k * h * f + 4 * t * h * f + 2 * t * h * ne)


def _routing_bytes(args, elem: int) -> float:
    """Bytes gate + sort + dispatch + combine must move, forward and backward, each tensor read or written once:
    dispatch x → x_sorted (T + T·k rows), combine x_sorted → y (T·k + T), its backward dy, x_sorted → grad rows
    (T + 2·T·k), dispatch backward (T·k + T); the gate reads the logits and writes gates and ids, its backward
    reads them again and writes the logit gradient; the sort reads the ids and writes the order."""
    t, h, k, ne = args.tokens, args.hidden, args.top_k, 2 * args.experts
    rows = (4 * t + 5 * t * k) * h * elem
    gate = 3 * t * ne * elem + 2 * t * k * (4 + 8)
    sort = 2 * t * k * 8
    return rows + gate + sort


def eager_routing(x, logits, gid, num_groups, top_k):
    """The routing a user writes in plain PyTorch; returns (y, balance loss) like the fused path."""
    n_tokens, ne = logits.shape
    n_experts = ne // num_groups
    col_group = torch.arange(ne, device=logits.device) // n_experts
    probs = torch.softmax(logits.float().masked_fill(col_group[None, :] != gid[:, None], float("-inf")), dim=-1)
    gates, ids = probs.topk(top_k, dim=-1)
    gates = gates / gates.sum(-1, keepdim=True)
    counts = torch.bincount(ids.flatten(), minlength=ne)
    group_tokens = torch.bincount(gid, minlength=num_groups)
    prob_mean = probs.sum(0) / group_tokens[col_group].clamp(min=1)
    order = ids.flatten().argsort(stable=True)
    token = order // top_k
    x_sorted = x.index_select(0, token)
    y_sorted = x_sorted  # identity experts: only the routing is measured
    y = torch.zeros_like(x).index_add_(0, token, y_sorted * gates.flatten()[order, None].to(x.dtype))
    frac = counts.view(num_groups, -1).float()
    frac = frac / frac.sum(1, keepdim=True).clamp(min=1)
    aux = n_experts * (frac * prob_mean.view(num_groups, -1)).sum()
    return y, aux


def kernel_routing(x, logits, gid, num_groups, top_k):
    from unif2ace import ops

    gates, ids, counts, prob_mean = ops.moe_gate(logits, gid, num_groups=num_groups, top_k=top_k)
    x_sorted, _, sorted_slot = ops.moe_dispatch(x, ids, logits.shape[1])
    y = ops.moe_combine(x_sorted, gates, sorted_slot)
    return y, ops.balance_loss(counts, prob_mean, num_groups)


def _layer(args, device, dtype):
    from unif2ace.nn import GroupedTokenMoE

    torch.manual_seed(0)
    m = GroupedTokenMoE(args.hidden, args.expert_hidden, num_groups=2, experts_per_group=args.experts,
                        top_k=args.top_k, shared_expert=True).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.router.normal_(0, 0.1)
    batch = max(1, args.tokens // 1024)
    x = torch.randn(batch, args.tokens // batch, args.hidden, device=device).to(dtype).requires_grad_()
    gid = (torch.arange(batch, device=device) % 2)
    return m, x, gid


def child(args) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.part == "ceilings":
        from benchmarks.harness import device_ceilings

        report(device_ceilings())
        return
    if args.part == "routing":
        ne = 2 * args.experts
        x = torch.randn(args.tokens, args.hidden, device=device).to(dtype).requires_grad_()
        logits = torch.randn(args.tokens, ne, device=device).to(dtype).requires_grad_()
        gid = torch.randint(0, 2, (args.tokens,), device=device)
        dy = torch.randn(args.tokens, args.hidden, device=device).to(dtype)
        fn = kernel_routing if args.variant == "kernels" else eager_routing

        def step(n=args.tokens):
            x.grad = logits.grad = None
            y, aux = fn(x[:n], logits[:n], gid[:n], 2, args.top_k)
            ((y * dy[:n]).sum() + aux).backward()

        step(64)  # one-time costs (library imports, op registration) stay out of the memory baseline
        report(measure_in_child(step, warmup=1, repeat=args.repeat, device=args.device))
        return

    m, x, gid = _layer(args, device, dtype)
    dy = torch.randn_like(x)
    if args.variant == "check":
        out = {}
        for backend in LAYER:
            m.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = m(x, gid, backend=backend)
            ((y * dy).sum() + aux).backward()
            out[backend] = (y.detach().float(), x.grad.float(), m.w1.grad.float())
        diffs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out["kernels"], out["reference"])]
        report({"y_rel": diffs[0], "grad_x_rel": diffs[1], "grad_w1_rel": diffs[2]})
        return

    backend, _, option = args.variant.partition("+")
    m.recompute = option == "recompute"

    def step(n=x.shape[1]):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y, aux = m(x[:, :n], gid, backend=backend)
        ((y * dy[:, :n]).sum() + aux).backward()

    step(16)  # one-time costs (library imports, op registration) stay out of the memory baseline
    m.zero_grad(set_to_none=True)
    x.grad = None
    report(measure_in_child(step, warmup=1, repeat=args.repeat, device=args.device))


def _child_args(args, part, variant, dtype):
    return ["--child", "--part", part, "--variant", variant, "--dtype", dtype, "--device", args.device,
            "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--expert-hidden", str(args.expert_hidden),
            "--experts", str(args.experts), "--top-k", str(args.top_k), "--repeat", str(args.repeat)]


def _rounds(args, part, variants, dtype, extra_env=None) -> dict:
    """Each variant in `args.rounds` fresh processes, the order reversed every other round; per variant the medians
    over the rounds of wall time, CPU time and peak RSS (the allocator peak is the same in every round)."""
    runs = {v: [] for v in variants}
    for i in range(args.rounds):
        for v in (variants if i % 2 == 0 else variants[::-1]):
            runs[v].append(run_isolated("benchmarks.bench_moe", _child_args(args, part, v, dtype),
                                        extra_env=extra_env))
    out = {}
    for v, rs in runs.items():
        out[v] = dict(rs[0], rounds=len(rs), time_s_rounds=[r["time_s"] for r in rs])
        for key in ("time_s", "cpu_s", "peak_rss_bytes", "peak_bytes"):
            if key in rs[0]:
                out[v][key] = statistics.median(r[key] for r in rs)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("routing", "layer", "ceilings"), default="layer", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="kernels", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--expert-hidden", type=int, default=None)
    p.add_argument("--experts", type=int, default=8, help="experts per group (2 groups)")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh-process runs per variant, in alternating order (A B, B A, ...); times are the median "
                        "over the rounds, which cancels much of a shared machine's drift")
    p.add_argument("--no-huge-page-control", dest="huge_page_control", action="store_false",
                   help="on the CPU, skip the second routing comparison in which both sides run with torch's "
                        "huge-page allocator (THP_MEM_ALLOC_ENABLE=1), which makes fresh buffers cheap to fault in "
                        "and so separates that cost from the work of the ops")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.tokens = args.tokens or (16384 if gpu else 8192)
    args.hidden = args.hidden or (2048 if gpu else 512)
    args.expert_hidden = args.expert_hidden or (1024 if gpu else 256)
    if args.child:
        return child(args)

    dtypes = [args.dtype] if args.dtype else ["float32", "bfloat16"]
    rows, results = [], []
    size = f"T={args.tokens} H={args.hidden} F={args.expert_hidden} 2x{args.experts} top-{args.top_k}"
    ceilings = run_isolated("benchmarks.bench_moe", _child_args(args, "ceilings", "-", "bfloat16")) if gpu else None
    for dtype in dtypes:
        parts = [("routing", ROUTING, None), ("layer", LAYER_GPU if gpu else LAYER, None)]
        if args.huge_page_control and not gpu:
            parts.insert(1, ("routing", ROUTING, {"THP_MEM_ALLOC_ENABLE": "1"}))
        for part, variants, extra_env in parts:
            r = _rounds(args, part, variants, dtype, extra_env)
            base = r[variants[0]]
            match = ""
            if part == "layer":
                c = run_isolated("benchmarks.bench_moe", _child_args(args, "layer", "check", dtype))
                match = f"y {c['y_rel']:.1e}, dx {c['grad_x_rel']:.1e}, dW1 {c['grad_w1_rel']:.1e}"
            what = "gate+dispatch+combine" if part == "routing" else "GroupedTokenMoE"
            if extra_env:
                what += " (THP alloc, both)"
            floor_s = None
            if ceilings is not None:
                elem = torch.tensor([], dtype=getattr(torch, dtype)).element_size()
                floor_s = (_layer_flops(args) / ceilings["bf16_matmul_flops"] if part == "layer"
                           else _routing_bytes(args, elem) / ceilings["copy_bytes_per_s"])
            for v in variants:
                t, mem = r[v]["time_s"], r[v]["peak_bytes"]
                floor_cols = [] if floor_s is None else [ms(floor_s), f"{100 * floor_s / t:.0f}%"]
                rows.append([what, dtype, v, ms(t), ms(r[v].get("cpu_s", float("nan"))), f"{base['time_s'] / t:.2f}x",
                             mib(mem),
                             f"{mem / max(1, base['peak_bytes']):.2f}x", rss_mib(r[v]), *floor_cols,
                             match if v == "kernels" else ""])
                results.append(dict(config=f"{what} {dtype}", part=part, dtype=dtype, variant=v, size=size,
                                    env=extra_env or {}, floor_s=floor_s, **r[v]))
    floor_heads = [] if ceilings is None else ["floor ms", "share of floor"]
    table = format_table(["what", "dtype", "variant", "fwd+bwd ms (median)", "CPU ms", "speed-up", "peak extra MiB",
                          "memory ratio", "peak RSS MiB", *floor_heads, "kernels vs reference (max rel. diff)"], rows)
    print(f"Grouped MoE forward+backward on {args.device}, {size} — {machine_line()}"
          + (f"; median of {args.rounds} alternating fresh-process rounds" if args.rounds > 1 else ""))
    print(table)
    if ceilings is not None:
        print(f"Floors from this run's ceilings: dense bf16 matmul {ceilings['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s "
              f"(GEMM floor of the layer: {_layer_flops(args) / 1e12:.2f} TFLOP per step), device copy "
              f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s (routing bytes per step: "
              f"{_routing_bytes(args, 2) / 1e9:.2f} GB in bf16).")
    else:
        print("GPU rows (bf16, T=16384 H=2048 F=1024 2x8 + shared, top-4: reference, kernels, kernels+recompute with "
              "their GEMM floor; routing with its bandwidth floor): not run: no CUDA device.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "ceilings": ceilings, "results": results}, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
