"""One MaskGIT step with classifier-free guidance: the eager Show-o step against the fused op.

Eager (what Show-o's t2i loop does per step, DESIGN §6 / showo.md §4): guidance (1+g)·c − g·u in the logits
dtype, softmax over [B, N, K], torch.multinomial for every position, gather of the drawn probabilities, log +
annealed Gumbel, a full sort of every row's confidences and a gather at the cut-off.
Fused: unif2ace.ops.maskgit_step (one read of each logit, no probability matrix, selection instead of sort).
Both at the first step (every position masked: the most work the fused kernel can have; it skips the logits of
already known positions at later steps, the eager step does not).

    python -m benchmarks.bench_sampling [--sizes 256,1024] [--repeat 5] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import math

import torch

from unif2ace import ops

try:
    from benchmarks.harness import format_table, machine_line, median_time, ms
except ImportError:  # run as a plain script
    from harness import format_table, machine_line, median_time, ms  # type: ignore


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="comma-separated N values")
    ap.add_argument("--codebook", type=int, default=8192)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    B = args.batch or (16 if cuda else 8)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1024] if cuda else [256, 1024])
    K, g, S, step = args.codebook, args.guidance, 18, 0
    print(f"# MaskGIT step with guidance {g}: eager Show-o step vs fused unif2ace.ops.maskgit_step")
    print(f"# {machine_line()}; device {args.device}; median of {args.repeat} runs after 1 warm-up\n")
    rows = []
    for N in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator(device=args.device).manual_seed(0)
            cond = torch.randn(B, N, K, generator=gen, device=args.device).mul_(3).to(dtype)
            uncond = torch.randn(B, N, K, generator=gen, device=args.device).mul_(3).to(dtype)
            tokens = torch.full((B, N), K, dtype=torch.int64, device=args.device)
            t_eager = median_time(
                lambda: eager_showo_step(cond, uncond, tokens, step, S, g, K, gen),
                repeat=args.repeat, device=args.device,
            )
            t_fused = median_time(
                lambda: ops.maskgit_step(cond, tokens, step, S, uncond_logits=uncond, guidance_scale=g, mask_id=K,
                                         seed=0, offset=step),
                repeat=args.repeat, device=args.device,
            )
            rows.append([B, N, K, str(dtype).replace("torch.", ""), ms(t_eager), ms(t_fused),
                         f"{t_eager / t_fused:.1f}x"])
            del cond, uncond
    print(format_table(["B", "N", "K", "dtype", "eager Show-o (ms)", "fused (ms)", "speed-up"], rows))


if __name__ == "__main__":
    main()
