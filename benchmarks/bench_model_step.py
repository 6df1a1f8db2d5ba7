"""Training-step time and peak memory of the assembled model, kernels vs reference backend.

    python -m benchmarks.bench_model_step [--preset tiny] [--batch 8] [--repeat 10] [--device cpu]

Each backend runs in a fresh process (benchmarks.harness.run_isolated): the same model weights (seed 0) and the
same mixed batch (half understanding, half generation rows), one step = forward + backward + AdamW update. Reports
the median step time over `repeat` steps after two warm-up steps, and the peak memory the first step adds (max RSS
delta on the CPU, max allocated on CUDA).
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.harness import format_table, machine_line, measure_in_child, mib, ms, report, run_isolated


def child(args) -> None:
    from unif2ace.model import UniF2aceConfig, UniF2aceModel, build_batch

    cfg = UniF2aceConfig.preset(args.preset)
    torch.manual_seed(0)
    model = UniF2aceModel(cfg, backend=args.backend).to(args.device)
    g = torch.Generator().manual_seed(0)
    n = args.batch // 2
    text = lambda k: torch.randint(0, cfg.text_vocab_size - 1, (k,), generator=g).tolist()  # noqa: E731
    codes = lambda: torch.randint(0, cfg.codebook_size, (cfg.num_image_tokens,), generator=g)  # noqa: E731
    batch = build_batch(cfg, understanding=[(codes(), text(12), text(24)) for _ in range(n)],
                        generation=[(text(24), codes()) for _ in range(args.batch - n)], generator=g)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)

    def step():
        torch.manual_seed(0)
        loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    result = measure_in_child(step, warmup=2, repeat=args.repeat, device=args.device)
    result.update(tokens=int(batch["input_ids"].numel()), params=model.num_parameters())
    report(result)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child
    args = p.parse_args()
    if args.backend:
        return child(args)
    rows = []
    for backend in ("kernels", "reference"):
        r = run_isolated("benchmarks.bench_model_step", ["--preset", args.preset, "--batch", str(args.batch),
                                                         "--repeat", str(args.repeat), "--device", args.device,
                                                         "--backend", backend])
        rows.append([backend, f"{r['params']:,}", r["tokens"], ms(r["time_s"]), mib(r["peak_bytes"])])
    print(f"preset {args.preset}, batch {args.batch}, {args.device}: {machine_line()}")
    print(format_table(["backend", "params", "tokens", "median step (ms)", "peak memory (MiB)"], rows))


if __name__ == "__main__":
    main()
