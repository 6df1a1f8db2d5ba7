"""End-to-end training step of UniF2ace (forward + backward + AdamW): backend="reference" against backend="kernels",
and against the kernels backend with the experts' hidden activations recomputed (moe_recompute=True), at several
sizes: step time, peak memory, and the largest batch that fits a memory budget.

    python -m benchmarks.bench_model_step                              # tiny, small, medium on this CPU
    python -m benchmarks.bench_model_step --presets tiny --repeat 5 --variants reference,kernels

Peak memory is the tensor memory the step holds at its peak above what it held before (the allocator's count, as
torch.cuda.max_memory_allocated on a GPU) and, on the CPU, also the peak RSS the step adds (which includes what
glibc keeps of freed memory; see benchmarks.harness). Each (preset, variant, batch) runs in a fresh process
(benchmarks.harness.run_isolated) with the same weights (seed 0) and the same mixed batch (half understanding rows:
image + 12-token prompt + 24-token answer; half generation rows: 24-token caption + masked image). The largest batch
under the budget comes from a straight-line fit of peak memory (allocated)
against batch size through two measured batch sizes (B/2 and B) — an estimate, labelled as such.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, rss_mib, run_isolated

# Variant name → model config overrides. The first is the baseline of the ratios.
VARIANTS = {
    "reference": {"backend": "reference"},
    "kernels": {"backend": "kernels"},
    "kernels+recompute": {"backend": "kernels", "moe_recompute": True},
}
DEFAULT_BATCH = {"tiny": 16, "small": 16, "medium": 8, "paper": 8}


def child(args) -> None:
    from unif2ace.model import UniF2aceConfig, UniF2aceModel, build_batch

    torch.set_num_threads(torch.get_num_threads())
    cfg = UniF2aceConfig.preset(args.preset).replace(**VARIANTS[args.variant])
    torch.manual_seed(0)
    model = UniF2aceModel(cfg).to(args.device)

    def make_batch(batch_size):
        g = torch.Generator().manual_seed(0)
        n = batch_size // 2
        text = lambda k: torch.randint(0, cfg.text_vocab_size - 1, (k,), generator=g).tolist()  # noqa: E731
        codes = lambda: torch.randint(0, cfg.codebook_size, (cfg.num_image_tokens,), generator=g)  # noqa: E731
        return build_batch(cfg, understanding=[(codes(), text(12), text(24)) for _ in range(n)],
                           generation=[(text(24), codes()) for _ in range(batch_size - n)], generator=g,
                           caption_dropout=0.0)

    batch = make_batch(args.batch)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step(b=batch):
        torch.manual_seed(0)
        loss = model(b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    # The pre-warm step on a 2-row batch also creates the optimizer state, which is then part of the baseline.
    small = make_batch(2)
    result = measure_in_child(step, warmup=1, repeat=args.repeat, device=args.device, prewarm=lambda: step(small))
    result.update(tokens=int(batch["input_ids"].numel()), params=model.num_parameters(),
                  loss=float(step().item()))
    report(result)


def measure(preset, variant, batch, repeat, device):
    return run_isolated("benchmarks.bench_model_step", ["--child", "--preset", preset, "--variant", variant,
                                                        "--batch", str(batch), "--repeat", str(repeat),
                                                        "--device", device], timeout=3600)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=tuple(VARIANTS), default="kernels", help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated, the first is the baseline (default: %(default)s)")
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--presets", default="tiny,small,medium")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget for the largest-batch estimate (default: 8 GiB on the CPU, the GPU's memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.budget_gib is None:
        args.budget_gib = (torch.cuda.get_device_properties(0).total_memory / 2**30 if args.device == "cuda" else 8.0)
    budget = args.budget_gib * 2**30
    rows, results = [], []
    for preset in args.presets.split(","):
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        base = None
        for variant in args.variants.split(","):
            full = measure(preset, variant, batch, args.repeat, args.device)
            half = measure(preset, variant, max(2, batch // 2), 1, args.device)
            per_row = (full["peak_bytes"] - half["peak_bytes"]) / (batch - max(2, batch // 2))
            fixed = full["peak_bytes"] - per_row * batch
            largest = int((budget - fixed) // per_row) if per_row > 0 else None
            r = dict(config=f"{preset} ({full['params'] / 1e6:.1f}M params) batch {batch}", preset=preset,
                     variant=variant, batch=batch, largest_batch_estimate=largest, budget_bytes=budget, **full)
            results.append(r)
            base = base or r
            rows.append([preset, f"{full['params'] / 1e6:.1f}M", batch, full["tokens"], variant, ms(full["time_s"]),
                         f"{full['time_s'] / base['time_s']:.2f}x", mib(full["peak_bytes"]),
                         f"{full['peak_bytes'] / max(1, base['peak_bytes']):.2f}x", rss_mib(full),
                         (f"{full['peak_rss_bytes'] / max(1, base['peak_rss_bytes']):.2f}x"
                          if "peak_rss_bytes" in full else "-"), largest,
                         f"{full['loss']:.4f}"])
    print(f"UniF2ace training step (forward + backward + AdamW) on {args.device} — {machine_line()}")
    print(f"largest batch: estimated from peak memory at B/2 and B, budget {args.budget_gib:.1f} GiB")
    print(format_table(["preset", "params", "batch", "tokens", "variant", "step ms", "time vs ref",
                        "peak MiB", "memory vs ref", "peak RSS MiB", "RSS vs ref", "largest batch", "loss"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
