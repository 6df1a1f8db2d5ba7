"""End-to-end training step of UniF2ace (forward + backward + AdamW): backend="reference" against backend="kernels",
and against the kernels backend with the experts' hidden activations recomputed (moe_recompute=True), at several
sizes: step time, peak memory, and the largest batch that fits a memory budget. On CUDA also the faster step
(flex_attention with the block mask, the fused AdamW, optionally compiled blocks and activation checkpointing)
with tokens/s and MFU, and a check that it trains like the plain step.

    python -m benchmarks.bench_model_step                              # tiny, small, medium on this CPU
    python -m benchmarks.bench_model_step --presets tiny --repeat 5 --variants reference,kernels
    python -m benchmarks.bench_model_step --device cuda --presets paper --batch 56 --no-largest \\
        --variants reference,kernels,kernels+flex+fused                # the paper preset at ~16.6k tokens
    python -m benchmarks.bench_model_step --device cuda --loss-check 20 --presets medium \\
        --variants kernels,kernels+flex+fused+compile                  # 20 steps: losses against the first variant

Peak memory is the tensor memory the step holds at its peak above what it held before (the allocator's count, as
torch.cuda.max_memory_allocated on a GPU) and, on the CPU, also the peak RSS the step adds (which includes what
glibc keeps of freed memory; see benchmarks.harness). Each (preset, variant, batch) runs in a fresh process
(benchmarks.harness.run_isolated) with the same weights (seed 0) and the same mixed batch (half understanding rows:
image + 12-token prompt + 24-token answer; half generation rows: 24-token caption + masked image). The largest batch
under the budget comes from a straight-line fit of peak memory (allocated)
against batch size through two measured batch sizes (B/2 and B) — an estimate, labelled as such.

On CUDA every variant trains under bf16 autocast with fp32 parameters and AdamW state (the trainer's default
there; --precision fp32 turns it off). MFU counts the model FLOPs of the step — 6 × (active parameters per token)
per real token (attention projections, the router, the top-k routed experts and the shared expert: experts a
token is not routed to do not count), the heads on the positions the losses read (answer tokens: text head;
masked image tokens: the K image-code rows), and the attention products over the (query, key) pairs the
omni-attention mask allows (12·H per pair and layer, forward + backward) — against the device's measured bf16
matmul rate (8192³) and, on H100/H200, the 989 TFLOP/s of the data sheet. Recomputation (checkpointing) is not
counted.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, rss_mib, run_isolated

# Variant name → (model config overrides, step options). The first variant given is the baseline of the ratios.
VARIANTS = {
    "reference": ({"backend": "reference"}, {}),
    "kernels": ({"backend": "kernels", "attention": "sdpa"}, {}),
    "kernels+recompute": ({"backend": "kernels", "attention": "sdpa", "moe_recompute": True}, {}),
    "kernels+flex+fused": ({"backend": "kernels", "attention": "flex"}, {"fused_adamw": True}),
    "kernels+flex+fused+compile": ({"backend": "kernels", "attention": "flex"}, {"fused_adamw": True,
                                                                                "compile": True}),
    "kernels+flex+fused+ckpt": ({"backend": "kernels", "attention": "flex"}, {"fused_adamw": True,
                                                                             "checkpoint": True}),
}
CPU_VARIANTS = "reference,kernels,kernels+recompute"
GPU_VARIANTS = "reference,kernels,kernels+flex+fused"
DEFAULT_BATCH = {"tiny": 16, "small": 16, "medium": 8, "paper": 8}
SPEC_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def make_batch(cfg, batch_size, seed=0):
    from unif2ace.model import build_batch

    g = torch.Generator().manual_seed(seed)
    n = batch_size // 2
    text = lambda k: torch.randint(0, cfg.text_vocab_size - 1, (k,), generator=g).tolist()  # noqa: E731
    codes = lambda: torch.randint(0, cfg.codebook_size, (cfg.num_image_tokens,), generator=g)  # noqa: E731
    return build_batch(cfg, understanding=[(codes(), text(12), text(24)) for _ in range(n)],
                       generation=[(text(24), codes()) for _ in range(batch_size - n)], generator=g,
                       caption_dropout=0.0)


def model_flops(cfg, batch) -> float:
    """Model FLOPs of one forward + backward over `batch` (see the module docstring)."""
    from unif2ace.model.attention import omni_attention_mask

    H = cfg.hidden_size
    real = batch["padding_mask"].bool()
    tokens = int(real.sum())
    per_token = (4 * H * H                                            # q, k, v, dense
                 + H * cfg.num_expert_groups * cfg.experts_per_group  # router logits
                 + cfg.moe_top_k * 2 * H * cfg.expert_hidden_size     # routed experts
                 + 2 * H * cfg.shared_hidden_size)                    # shared expert
    mask = omni_attention_mask(batch["input_ids"], real, cfg.soi_token_id, cfg.eoi_token_id)
    pairs = int((mask[:, 0] & real[:, :, None] & real[:, None, :]).sum())
    text_rows = int((batch["labels"][:, 1:] != -100).sum())
    image_rows = int((batch["image_targets"] != -100).sum())
    forward = (2 * per_token * tokens * cfg.num_layers + 4 * H * pairs * cfg.num_layers
               + 2 * H * (text_rows * cfg.image_token_offset + image_rows * cfg.codebook_size))
    return 3.0 * forward


def child(args) -> None:
    from unif2ace.model import UniF2aceConfig, UniF2aceModel

    overrides, opts = VARIANTS[args.variant]
    cfg = UniF2aceConfig.preset(args.preset).replace(**overrides)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = UniF2aceModel(cfg)
    model.set_activation_checkpointing(opts.get("checkpoint", False))
    if opts.get("compile"):
        model.compile_blocks()
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,
                              enabled=args.precision == "bf16")
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, fused=opts.get("fused_adamw") or None)
    batch = make_batch(cfg, args.batch)

    def step(b=batch):
        torch.manual_seed(0)
        with autocast:
            loss = model(b).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    if args.losses:
        report({"losses": [float(step(make_batch(cfg, args.batch, seed=s)).item()) for s in range(args.losses)]})
        return
    # The pre-warm step on a 2-row batch also creates the optimizer state, which is then part of the baseline.
    small = make_batch(cfg, 2)
    result = measure_in_child(step, warmup=1, repeat=args.repeat, device=args.device, prewarm=lambda: step(small))
    result.update(tokens=int(batch["input_ids"].numel()), real_tokens=int(batch["padding_mask"].sum()),
                  params=model.num_parameters(), loss=float(step().item()), flops=model_flops(cfg, batch))
    report(result)


def measure(preset, variant, batch, repeat, device, precision, losses=0):
    args = ["--child", "--preset", preset, "--variant", variant, "--batch", str(batch), "--repeat", str(repeat),
            "--device", device, "--precision", precision, "--losses", str(losses)]
    return run_isolated("benchmarks.bench_model_step", args, timeout=3600)


def matmul_ceiling() -> float:
    from benchmarks.harness import median_time

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    return 2 * 8192**3 / median_time(lambda: a @ a, warmup=3, repeat=10, device="cuda")


def loss_check(args) -> list[dict]:
    """Per-step losses of every variant over the same batches, against the first variant."""
    rows, results = [], []
    for preset in args.presets.split(","):
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        runs = {v: measure(preset, v, batch, 1, args.device, args.precision, args.loss_check)["losses"]
                for v in args.variants.split(",")}
        base_name, base = next(iter(runs.items()))
        for v, losses in runs.items():
            diff = max(abs(a - b) / abs(b) for a, b in zip(losses, base))
            results.append(dict(config=f"{preset} batch {batch}: {args.loss_check} steps", variant=v, losses=losses,
                                max_rel_diff=diff))
            rows.append([preset, batch, v, f"{losses[0]:.4f}", f"{losses[-1]:.4f}", f"{diff:.2e}"])
    print(f"Loss over {args.loss_check} steps (same batches and seeds), {args.precision}, on {args.device} — "
          f"{machine_line()}")
    print(format_table(["preset", "batch", "variant", "first loss", "last loss",
                        f"max relative difference vs {base_name}"], rows))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=tuple(VARIANTS), default="kernels", help=argparse.SUPPRESS)
    p.add_argument("--losses", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, the first is the baseline (default: {CPU_VARIANTS} on the CPU, "
                        f"{GPU_VARIANTS} on CUDA); all: {', '.join(VARIANTS)}")
    p.add_argument("--preset", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--presets", default="tiny,small,medium")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16 autocast (fp32 parameters) or fp32 (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--no-largest", action="store_true", help="skip the B/2 run of the largest-batch estimate")
    p.add_argument("--loss-check", type=int, default=0, metavar="STEPS",
                   help="instead of timing: train STEPS steps per variant and compare the losses")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="memory budget for the largest-batch estimate (default: 8 GiB on the CPU, the GPU's memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    if args.child:
        return child(args)
    args.variants = args.variants or (GPU_VARIANTS if cuda else CPU_VARIANTS)
    if args.loss_check:
        results = loss_check(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine_line(), "results": results}, f, indent=2)
        return
    if args.budget_gib is None:
        args.budget_gib = (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 8.0)
    budget = args.budget_gib * 2**30
    peak_flops, spec_flops = (matmul_ceiling(), None) if cuda else (None, None)
    if cuda:
        spec_flops = next((v for k, v in SPEC_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    rows, results = [], []
    for preset in args.presets.split(","):
        batch = args.batch or DEFAULT_BATCH.get(preset, 8)
        base = None
        for variant in args.variants.split(","):
            try:
                full = measure(preset, variant, batch, args.repeat, args.device, args.precision)
            except RuntimeError as e:  # e.g. out of memory: report it, go on with the other variants
                print(f"{preset} {variant} batch {batch}: FAILED\n{str(e)[-1500:]}")
                continue
            largest = None
            if not args.no_largest:
                half = measure(preset, variant, max(2, batch // 2), 1, args.device, args.precision)
                per_row = (full["peak_bytes"] - half["peak_bytes"]) / (batch - max(2, batch // 2))
                fixed = full["peak_bytes"] - per_row * batch
                largest = int((budget - fixed) // per_row) if per_row > 0 else None
            r = dict(config=f"{preset} ({full['params'] / 1e6:.1f}M params) batch {batch}", preset=preset,
                     variant=variant, batch=batch, largest_batch_estimate=largest, budget_bytes=budget,
                     precision=args.precision, **full)
            r["tokens_per_s"] = full["real_tokens"] / full["time_s"]
            if peak_flops:
                r["mfu_measured_peak"] = full["flops"] / full["time_s"] / peak_flops
                r["mfu_spec_peak"] = full["flops"] / full["time_s"] / spec_flops if spec_flops else None
            results.append(r)
            base = base or r
            row = [preset, f"{full['params'] / 1e6:.1f}M", batch, full["real_tokens"], variant, ms(full["time_s"]),
                   f"{full['time_s'] / base['time_s']:.2f}x", f"{r['tokens_per_s']:,.0f}", mib(full["peak_bytes"]),
                   f"{full['peak_bytes'] / max(1, base['peak_bytes']):.2f}x"]
            if cuda:
                row += [f"{100 * r['mfu_measured_peak']:.1f}%",
                        f"{100 * r['mfu_spec_peak']:.1f}%" if r["mfu_spec_peak"] else "-"]
            else:
                row += [rss_mib(full), (f"{full['peak_rss_bytes'] / max(1, base['peak_rss_bytes']):.2f}x"
                                        if "peak_rss_bytes" in full else "-")]
            rows.append(row + ["-" if largest is None else largest, f"{full['loss']:.4f}"])
    print(f"UniF2ace training step (forward + backward + AdamW, {args.precision}) on {args.device} — {machine_line()}")
    if not args.no_largest:
        print(f"largest batch: estimated from peak memory at B/2 and B, budget {args.budget_gib:.1f} GiB")
    if cuda:
        print(f"MFU: model FLOPs per second over the measured bf16 matmul rate ({peak_flops / 1e12:.0f} TFLOP/s)"
              + (f" and over the data sheet's {spec_flops / 1e12:.0f} TFLOP/s" if spec_flops else ""))
    head = ["preset", "params", "batch", "real tokens", "variant", "step ms", "time vs ref", "tokens/s", "peak MiB",
            "memory vs ref"]
    head += ["MFU (measured)", "MFU (spec)"] if cuda else ["peak RSS MiB", "RSS vs ref"]
    print(format_table(head + ["largest batch", "loss"], rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_line(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
